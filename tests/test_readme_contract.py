"""The README's two commands are the contract; .ci/run must run exactly the second one."""
import re
import subprocess


def readme_commands():
    text = open("README.md").read()
    return re.findall(r"^    \$ (.+)$", text, flags=re.M)


def test_readme_has_install_and_test_commands_first():
    cmds = readme_commands()
    assert len(cmds) >= 2
    assert "agro-train" in cmds[0] and "pip install" in cmds[0]
    assert "pytest" in cmds[1] and "pip install" in cmds[1] and "[test]" in cmds[1]


def test_ci_runs_exactly_the_readme_test_command():
    extracted = subprocess.run(["bash", "-c", "sed -n 's/^    \\$ //p' README.md | sed -n 2p"],
                               capture_output=True, text=True, check=True).stdout.strip()
    assert extracted == readme_commands()[1]
    assert 'bash -c "$(sed -n' in open(".ci/run").read()

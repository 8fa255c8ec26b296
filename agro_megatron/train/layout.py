"""The sequence layout: P prompts x n responses -> token rows -> micro-batches, and back.

A row is prompt + response. Position t of a row predicts token t + 1, so a response's k-th
token is predicted at position `prompt length - 1 + k`: that offset is applied here and nowhere
else. Rows are packed into right-padded micro-batches under a token budget (sorted by length;
all the same shape under pipeline parallelism, whose schedule needs one shape). Under context
parallelism each rank sees only its share of every micro-batch's positions
(`MicroBatch.split_for_context_parallel`, megatron's load-balanced 2 x CP chunks); the schedule
(train/pipeline.py) applies that split and gathers per-position results back, so what comes out
of this module and goes into it is always whole sequences.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from agro_megatron.ops.context_parallel import cp_size_and_rank, split_sequence


@dataclasses.dataclass
class MicroBatch:
    tokens: torch.Tensor          # [b, L] input ids (right padded)
    labels: torch.Tensor          # [b, L] next-token ids (pad where loss_mask == 0)
    loss_mask: torch.Tensor       # [b, L] 1 where the position predicts a response token
    index: torch.Tensor           # [b] rows of the full batch these sequences are (-1: padding row)
    extra: dict = dataclasses.field(default_factory=dict)  # more per-position [b, L] tensors

    @property
    def response_lengths(self) -> torch.Tensor:
        """[b] response tokens of each whole sequence (not of a context-parallel share)."""
        return self.extra.get("response_lengths", self.loss_mask.sum(-1))

    def split_for_context_parallel(self, cp_size: int, cp_rank: int) -> "MicroBatch":
        """This CP rank's positions of every [b, L] tensor; whole-sequence facts stay whole."""
        if cp_size == 1:
            return self

        def cut(t):
            return split_sequence(t, 1, cp_size, cp_rank)

        extra = {k: cut(v) for k, v in self.extra.items()}
        extra["response_lengths"] = self.response_lengths
        return MicroBatch(cut(self.tokens), cut(self.labels), cut(self.loss_mask), self.index, extra)


def make_micro_batches(tokens: list[list[int]], prompt_lens: list[int], *, pad_id: int,
                       max_tokens: int, uniform: bool, pad_multiple: int = 8) -> list[MicroBatch]:
    """Pack rows (prompt + response ids) into right-padded micro-batches under a token budget.

    Every row keeps its number (`index`) so per-position results can be scattered back.
    `uniform=True` (pipeline parallel) gives every micro-batch the same [b, L]. Lengths are padded
    to a multiple of `pad_multiple` and of 2 x CP (context parallelism's chunks).
    """
    if not tokens:
        return []
    pad_multiple = math.lcm(pad_multiple, 2 * cp_size_and_rank()[0])
    lengths = [len(t) for t in tokens]
    longest = max(lengths)
    L_all = -(-longest // pad_multiple) * pad_multiple
    per_mb = max(1, min(len(tokens), max_tokens // L_all))
    order = list(range(len(tokens))) if uniform else sorted(range(len(tokens)), key=lambda i: lengths[i])
    out = []
    for start in range(0, len(order), per_mb):
        rows = order[start:start + per_mb]
        L = L_all if uniform else -(-max(lengths[i] for i in rows) // pad_multiple) * pad_multiple
        b = per_mb if uniform else len(rows)
        tok = torch.full((b, L), pad_id, dtype=torch.long)
        lab = torch.full((b, L), pad_id, dtype=torch.long)
        mask = torch.zeros((b, L), dtype=torch.float32)
        index = torch.full((b,), -1, dtype=torch.long)
        for j, i in enumerate(rows):
            seq = torch.tensor(tokens[i], dtype=torch.long)
            n = len(seq)
            tok[j, :n] = seq
            lab[j, :n - 1] = seq[1:]
            mask[j, prompt_lens[i] - 1:n - 1] = 1.0  # positions predicting response tokens
            index[j] = i
        out.append(MicroBatch(tok, lab, mask, index))
    return out


def scatter_rows(stats: list[dict], micro_batches: list[MicroBatch], key: str, num_rows: int,
                 length: int) -> torch.Tensor:
    """Reassemble a per-position stat [b, L] from every micro-batch into [num_rows, length]."""
    out = torch.zeros(num_rows, length, dtype=torch.float32)
    for st, mb in zip(stats, micro_batches):
        valid = mb.index >= 0
        vals = st[key].detach().float().cpu()[valid]
        L = min(length, vals.shape[1])
        out[mb.index[valid], :L] = vals[:, :L]
    return out


class SequenceLayout:
    """One rollout batch's rows and micro-batches, and the maps between [P, n, T] and positions.

    `prompts`: P prompt token lists; `responses`: P lists of n response token lists.
    """

    def __init__(self, prompts: list[list[int]], responses: list[list[list[int]]], *, pad_id: int,
                 max_tokens: int, uniform: bool):
        self.num_prompts, self.n = len(responses), len(responses[0])
        self.rows, self.prompt_lens, self.response_lens = [], [], []
        for prompt, group in zip(prompts, responses):
            for response in group:
                self.rows.append(list(prompt) + list(response))
                self.prompt_lens.append(len(prompt))
                self.response_lens.append(len(response))
        self.micro_batches = make_micro_batches(self.rows, self.prompt_lens, pad_id=pad_id,
                                                max_tokens=max_tokens, uniform=uniform)

    @property
    def num_sequences(self) -> int:
        return len(self.rows)

    @property
    def longest_response(self) -> int:
        return max(max(self.response_lens), 1)

    def _response_slice(self, row: int) -> slice:
        start = self.prompt_lens[row] - 1  # the position predicting the response's first token
        return slice(start, start + self.response_lens[row])

    def to_responses(self, stats: list[dict], key: str) -> torch.Tensor:
        """Per-position stat `key` of every micro-batch (whole sequences) -> [P, n, T] float64."""
        rows = scatter_rows(stats, self.micro_batches, key, self.num_sequences, max(len(r) for r in self.rows))
        out = torch.zeros(self.num_prompts, self.n, self.longest_response, dtype=torch.float64)
        for k in range(self.num_sequences):
            out[k // self.n, k % self.n, :self.response_lens[k]] = rows[k, self._response_slice(k)].double()
        return out

    def from_samples(self, values: list[list[list[float]]]) -> torch.Tensor:
        """Per-token values given per sample (P x n lists, one value per response token, e.g. the
        engine's log-probs) -> [P, n, T] float64, 0 past each response's end."""
        out = torch.zeros(self.num_prompts, self.n, self.longest_response, dtype=torch.float64)
        for k, length in enumerate(self.response_lens):
            row = values[k // self.n][k % self.n]
            if len(row) != length:
                raise ValueError(f"sample {k}: {len(row)} values for a {length}-token response")
            out[k // self.n, k % self.n, :length] = torch.tensor(row, dtype=torch.float64)
        return out

    def response_mask(self) -> torch.Tensor:
        """[P, n, T] float64: 1 on response tokens."""
        mask = torch.zeros(self.num_prompts, self.n, self.longest_response, dtype=torch.float64)
        for k, length in enumerate(self.response_lens):
            mask[k // self.n, k % self.n, :length] = 1.0
        return mask

    def place(self, name: str, values: torch.Tensor) -> None:
        """Put [P, n, T] per-response-token values at their positions: `extra[name]` [b, L] of every
        micro-batch (float32; 0 on prompts and padding)."""
        flat = values.reshape(self.num_sequences, -1)
        for mb in self.micro_batches:
            placed = torch.zeros(mb.tokens.shape, dtype=torch.float32)
            for j, row in enumerate(mb.index.tolist()):
                if row >= 0:
                    placed[j, self._response_slice(row)] = flat[row, :self.response_lens[row]].float()
            mb.extra[name] = placed

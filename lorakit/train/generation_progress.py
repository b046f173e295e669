"""Progress inside greedy generation (scoring before and after training, ``lorakit eval``): one count per decode
step of every batch, so a bar moves (and a log gets its lines) during one long batch too.

Scoring used to split a held-out set into at least 8 batches when progress was shown, only for a bar of batches to
move; on a GPU one large batch is several times faster. Now the batch size is chosen for speed alone, and the count is
of steps: the total is the sum over batches of their step budgets (the largest ``max_new_tokens`` of their rows,
each step generating one token per row). transformers' ``generate`` hands each step's new tokens ``(B,)`` to a
streamer; :class:`StepStreamer` counts them and sees which rows reached a stop token (records done). A batch whose
rows all stop early jumps to the end of its budget. The tokens are the ones generated anyway: the texts are unchanged.

Example line in a log: ``generating: 40/128 steps, 12/64 records done, 0:00:20 elapsed, 0:00:44 left``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from lorakit._progress import counter


class GenerationProgress:
    """A display of the decode steps of ``records`` rows over batches whose step budgets sum to ``total_steps``.

    Args:
        total_steps: sum over the batches that run of their step budgets.
        records: rows in all, for the "records done" note.
        mode: True (a tqdm bar), ``"lines"`` (plain lines for a log) or False (nothing: :meth:`streamer` gives None,
            and ``generate`` runs exactly as without progress).
        stop_ids: token ids that end a row.
    """

    def __init__(self, total_steps: int, records: int, mode: bool | str, stop_ids: Sequence[int]) -> None:
        self.enabled = bool(mode)
        self.records, self.done, self.stop_ids = records, 0, frozenset(int(t) for t in stop_ids)
        self.shown = counter(total_steps, "generating", mode, unit="step")
        self._note()

    def _note(self) -> None:
        self.shown.set_postfix_str(f"{self.done}/{self.records} records done", refresh=False)

    def streamer(self, rows: int, budget: int) -> "StepStreamer | None":
        """A streamer for one ``generate`` call of ``rows`` rows and at most ``budget`` steps; None when progress is
        off (no streamer passed: no host copy of each step's tokens)."""
        return StepStreamer(self, rows, budget) if self.enabled else None

    def finished(self, streamer: "StepStreamer | None") -> None:
        """After a ``generate`` call: its batch's rows are all done, and the count stands at the end of its budget."""
        if streamer is None:
            return
        if streamer.counted < streamer.rows:  # rows its budget cut: done too
            self.done += streamer.rows - streamer.counted
            self._note()
        self.shown.update(streamer.budget - streamer.steps)

    def skipped(self, rows: int) -> None:
        """A batch that cannot generate anything (its prompts fill the context): its rows are done, with no step."""
        if self.enabled:
            self.done += rows
            self._note()
            self.shown.update(0)

    def close(self) -> None:
        self.shown.close()


class StepStreamer(BaseStreamer):
    """transformers' streamer protocol (``put`` for each step's new tokens, ``end``), counting steps.

    The first ``put`` is the prompt ``(B, L)``; each later one the step's tokens, ``(B,)`` (or ``(B, k)`` for k steps
    at once). ``stopped (B,)`` marks the rows that generated a stop token; a stopped row's later tokens are padding.
    Greedy decoding only (what scoring runs): a beam search's tokens per step are not one per row.
    """

    def __init__(self, progress: GenerationProgress, rows: int, budget: int) -> None:
        self.progress, self.rows, self.budget = progress, rows, budget
        self.steps, self.prompt_seen, self.counted = 0, False, 0  # counted: rows already said to be done
        self.stopped = torch.zeros(rows, dtype=torch.bool)
        self.stop = torch.tensor(sorted(progress.stop_ids), dtype=torch.long)

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate streams the prompt first
            self.prompt_seen = True
            return
        tokens = value.reshape(self.rows, -1).cpu()  # (B, k), k steps (1 for greedy decoding)
        steps = min(tokens.shape[1], self.budget - self.steps)
        if steps <= 0:
            return
        self.stopped |= torch.isin(tokens[:, :steps], self.stop).any(dim=1)
        self.steps += steps
        # at the end of its budget every row is done: said with the batch's last step, not in a line after it
        done = self.rows if self.steps >= self.budget else int(self.stopped.sum())
        if done > self.counted:
            self.progress.done += done - self.counted
            self.counted = done
            self.progress._note()
        self.progress.shown.update(steps)

    def end(self) -> None:
        pass


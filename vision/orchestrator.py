"""VaLoRA's orchestrator: per step, run merged, unmerged or mixture, switching when it pays.

* **merged** (adapter k): every running request uses k; k is folded into the weights, no LoRA cost.
* **unmerged**: base product + one ATMM call for every adapter in the batch.
* **mixture** (k merged): requests of k run free; the others add ``x(B_iA_i − B_kA_k)`` (two ATMM calls).

Policy (after VaLoRA §4, "merge the dominant adapter when it holds most of the batch, otherwise
unmerge", with costs measured instead of assumed): under "auto" the scheduler admits requests in arrival
order, whatever their adapters, and each step runs the cheapest of unmerged, mixture(k) and merged(k),
k the adapter with most tokens. The LoRA work of a step is priced as
``calls × call_ms + extra segments × segment_ms + tokens × token_ms`` over all layers, each term measured
on the running device (``Scheduler.calibrate``: real forwards with and without LoRA): on a GPU one Triton
launch covers every adapter, so the call dominates and a second call (mixture's subtract term) costs as
much as it saves; on a CPU every adapter segment is its own pair of matrix products. A new merge is
charged its measured cost spread over the steps it may serve: the steps k's running requests may still
take, or, if shorter, the measured mean length of runs of single-adapter steps (under load, arrivals of
other adapters mix the batch again within a few steps). So a lone adapter on a quiet server runs merged;
a short answer, a busy server or a mixed batch runs unmerged.

Admission in adapter lanes (a lane admits only its adapter, so its steps run merged; VaLoRA's credits
bound how long others wait) was this policy until the CPU path got cheap: once a LoRA projection's
overhead fell from ~48 to ~7 µs and the scheduler thread stopped paying OpenMP wake-ups, lanes cost more
in queueing than they saved in LoRA work (docs/vision.md has the figures). The "merged" baseline still
runs lanes, with no bound.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from enum import StrEnum

import torch

from vision.lora.atmm import make_batch_info
from vision.lora_linear import LoRAContext, LoRALinear


class Mode(StrEnum):
    UNMERGED = "unmerged"
    MERGED = "merged"
    MIXTURE = "mixture"


POLICIES = ("auto", "unmerged", "merged", "mixture")


@dataclass
class OrchestratorConfig:
    policy: str = "auto"  # "auto", or force one mode ("merged" serves one adapter per step: see Scheduler)
    horizon_steps: int = 32  # steps a merge is expected to last when the requests' lengths are unknown
    ema: float = 0.2

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        if self.horizon_steps < 1:
            raise ValueError("horizon_steps must be >= 1")


@dataclass(frozen=True)
class Plan:
    mode: Mode
    slot: int = -1  # merged adapter's slot (merged / mixture)


class Orchestrator:
    """Decides each step's mode, applies it to the wrapped layers, and keeps the cost measurements."""

    def __init__(self, layers: dict[str, LoRALinear], ctx: LoRAContext, cfg: OrchestratorConfig | None = None) -> None:
        self.layers, self.ctx = layers, ctx
        self.cfg = cfg or OrchestratorConfig()
        self.current = Plan(Mode.UNMERGED)
        first = next(iter(layers.values()))
        self._first = first
        self.device = first.lora_a.device
        if ctx.slot_ranks is None:
            raise ValueError("the LoRA context has no slot_ranks: wrap the layers with wrap_decoder_layers")
        self.slot_ranks = ctx.slot_ranks  # each slot's adapter rank, whatever layers it targets
        # LoRA cost model (ms, all layers), measured by calibrate(); until then relative CPU-like units
        self.call_ms, self.segment_ms, self.token_ms = 1.0, 1.0, 0.01
        self.base_step_ms: float | None = None  # the calibration's decode step without LoRA (what LoRA adds to)
        self.base_step_tokens = 0  # of this many tokens
        self.switch_ms = 0.0  # the last real merge of all layers (ms)
        self.merge_ms, self.merge_ms_per_rank = 0.0, 0.0  # the merge cost model: time_merges(), then real merges
        self.calibrated = False
        self.merges_observed = 0  # real merges folded into merge_ms (see _observe_merge)
        self.run_steps: float | None = None  # mean length of single-adapter runs of steps (see _observe_run)
        self._run_slot: int | None = None
        self._run_len = 0
        self.switches = 0
        self.mode_steps: Counter[str] = Counter()

    # ------------------------------------------------------------------ policy
    def atmm_cost(self, tokens: int, segments: int) -> float:
        """Modelled ms of one ATMM call over every layer."""
        if tokens == 0:
            return 0.0
        return self.call_ms + self.segment_ms * (segments - 1) + self.token_ms * tokens

    def plan_cost(self, plan: Plan, token_slots: list[int]) -> float:
        counts = Counter(s for s in token_slots if s >= 0)
        if plan.mode == Mode.UNMERGED:
            return self.atmm_cost(sum(counts.values()), len(counts))
        n_k = counts.pop(plan.slot, 0)
        if plan.mode == Mode.MERGED:
            return 0.0 if n_k == len(token_slots) else math.inf
        add = self.atmm_cost(sum(counts.values()), len(counts))
        return add + self.atmm_cost(len(token_slots) - n_k, 1)  # subtract k's delta from every other token

    def decide(self, token_slots: list[int], waiting: list[tuple[int, float]] | None = None,
               remaining: dict[int, int] | None = None) -> Plan:
        """The step's plan.

        ``token_slots``: the step's adapter slot per token (-1 = base); ``waiting``: (slot, waited ms) of
        queued requests (unused by the cost model, kept for policies that look ahead); ``remaining``: per
        slot, the most steps any of its running requests may still take (how long a merge can pay off).
        """
        policy = self.cfg.policy
        if policy == "unmerged":
            return Plan(Mode.UNMERGED)
        counts = Counter(s for s in token_slots if s >= 0)
        if not counts:
            return Plan(Mode.UNMERGED)  # base tokens only: no LoRA work either way
        k, n_k = counts.most_common(1)[0]
        alone = n_k == len(token_slots)
        self._observe_run(k if alone else None)
        if policy == "merged":
            return Plan(Mode.MERGED, k)
        if policy == "mixture":
            return Plan(Mode.MERGED if alone else Mode.MIXTURE, k)
        candidates = [Plan(Mode.UNMERGED), Plan(Mode.MERGED if alone else Mode.MIXTURE, k)]
        cur = self.current
        if cur.slot >= 0 and cur.slot != k:
            mine = counts.get(cur.slot, 0)
            candidates.append(Plan(Mode.MERGED if mine == len(token_slots) else Mode.MIXTURE, cur.slot))
        steps = max(1, (remaining or {}).get(k, self.cfg.horizon_steps))
        if self.run_steps is not None:  # arrivals of other adapters end a merge's use sooner than that
            steps = max(1, min(steps, round(self.run_steps)))

        def total(plan: Plan) -> float:
            cost = self.plan_cost(plan, token_slots)
            if plan.slot >= 0 and self._stale(plan.slot):
                cost += self.merge_cost(plan.slot) / steps  # a new merge, spread over the steps it may serve
            return cost

        return min(candidates, key=total)  # ties go to the first: unmerged

    def _observe_run(self, alone: int | None) -> None:
        """Track runs of consecutive steps whose tokens are all one adapter's (``alone``: that slot, or
        None): ``run_steps`` is a moving average of their lengths, how long a merge is used before the
        batch mixes again or drains. Under load, where other adapters keep arriving, runs are short and
        a merge rarely pays; on a quiet server a lone request's run is its whole answer."""
        if alone is not None and alone == self._run_slot:
            self._run_len += 1
            return
        if self._run_len:
            a = self.cfg.ema
            self.run_steps = self._run_len if self.run_steps is None else (1 - a) * self.run_steps + a * self._run_len
        self._run_slot, self._run_len = (alone, 1) if alone is not None else (None, 0)

    # ------------------------------------------------------------------ apply
    def apply(self, plan: Plan, token_slots: torch.Tensor) -> None:
        """Merge as the plan says (measured) and set the shared context for this step's forward."""
        self.prepare(plan)
        self.set_batch(plan, token_slots)

    def prepare(self, plan: Plan) -> None:
        """The plan's merge (timed) and bookkeeping; sets the context's merged slot, not its batches."""
        if plan.mode != Mode.UNMERGED and self._stale(plan.slot):
            t0 = time.perf_counter()
            for layer in self.layers.values():
                layer.merge(plan.slot)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.switch_ms = (time.perf_counter() - t0) * 1e3
            self.switches += 1
            self._observe_merge(plan.slot, self.switch_ms)
        elif plan.mode != self.current.mode:
            self.switches += 1
        self.mode_steps[plan.mode.value] += 1
        self.current = plan
        self.ctx.merged_slot = -1 if plan.mode == Mode.UNMERGED else plan.slot

    def set_batch(self, plan: Plan, token_slots: torch.Tensor) -> None:
        """The context's LoRA batches for a forward of ``token_slots`` under a prepared plan."""
        add, sub = self.batch_slots(plan, token_slots.tolist())

        def info(slots: list[int] | None):
            if slots is None:
                return None
            return make_batch_info(torch.tensor(slots, dtype=torch.long, device=token_slots.device), self.slot_ranks)

        self.ctx.add, self.ctx.subtract = info(add), info(sub)

    @staticmethod
    def batch_slots(plan: Plan, token_slots: list[int]) -> tuple[list[int] | None, list[int] | None]:
        """Per token, the slot whose delta it adds and the slot whose delta it subtracts (-1: none; None: no such
        token at all). The one definition of the modes' LoRA work: :meth:`set_batch` builds batches from it, and
        the static batches of vision.step_graphs are filled from it."""
        if plan.mode == Mode.UNMERGED:
            return (token_slots if any(s >= 0 for s in token_slots) else None), None
        k = plan.slot
        own = [-1 if s == k else s for s in token_slots]
        if plan.mode == Mode.MERGED and any(s >= 0 for s in own):
            raise RuntimeError("merged mode with tokens of another adapter")
        sub = [k if s != k else -1 for s in token_slots]
        return (own if any(s >= 0 for s in own) else None), (sub if any(s >= 0 for s in sub) else None)

    def _stale(self, slot: int) -> bool:
        """Whether the layers' merged buffers do not hold ``slot`` (the manager refills every layer of a slot
        together, so the first layer speaks for all)."""
        return self._first._merged_slot != slot

    def fit(self, base: dict[str, float], lora: dict[str, float], tokens: int, wide: int, segments: int) -> None:
        """Set the LoRA cost model from measured forwards (see ``Scheduler.calibrate``): ``lora[x] - base[x]``
        is the LoRA share of forward x; "narrow" is ``segments`` decode tokens of one adapter, "spread" the
        same tokens each of its own adapter, "wide" one ``wide``-token prompt of one adapter."""
        narrow = max(lora["narrow"] - base["narrow"], 0.0)
        spread = max(lora["spread"] - base["narrow"], 0.0)
        wide_ms = max(lora["wide"] - base["wide"], 0.0)
        self.base_step_ms, self.base_step_tokens = base["narrow"], tokens
        self.token_ms = max(wide_ms - narrow, 0.0) / max(wide - tokens, 1)
        self.call_ms = max(narrow - self.token_ms * tokens, 1e-6)
        self.segment_ms = max(spread - narrow, 0.0) / max(segments - 1, 1)

    @torch.inference_mode()
    def time_merges(self) -> None:
        """A merge's cost as ``merge_ms + merge_ms_per_rank × r``: timed at rank 1 and the largest rank."""
        layers = list(self.layers.values())
        r_max = layers[0].lora_a.shape[1]

        def once(r: int) -> float:
            best = math.inf
            for _ in range(2):
                self._sync()
                t0 = time.perf_counter()
                for layer in layers:
                    layer.merge(0, rank=r)
                self._sync()
                best = min(best, (time.perf_counter() - t0) * 1e3)
            for layer in layers:
                layer._merged_slot = -1  # a timing merge is not a real one
            return best

        low, high = once(1), once(r_max)
        self.merge_ms_per_rank = max(high - low, 0.0) / max(r_max - 1, 1)
        self.merge_ms = max(low - self.merge_ms_per_rank, 0.0)
        self.calibrated = True
        self.merges_observed = 0  # the next real merge replaces this warm-cache figure

    def _observe_merge(self, slot: int, ms: float) -> None:
        """Fold a real merge's time into the model's fixed part (the first replaces the calibration's, later
        ones move a moving average). Calibration times merges back to back, with the weights in cache; in
        service a merge reads weights that the steps in between evicted: on a 2-core CPU, 8 layers, merges
        calibrated at 14-21 ms took 44-83 ms while serving."""
        fixed = max(ms - self.merge_ms_per_rank * self.ctx.slot_ranks_host[slot], 0.0)
        if self.merges_observed == 0:
            self.merge_ms = fixed
        else:
            self.merge_ms += self.cfg.ema * (fixed - self.merge_ms)
        self.merges_observed += 1

    def merge_cost(self, slot: int) -> float:
        """What merging ``slot`` now would cost (ms): the measured model, or the last merge before any."""
        if not (self.calibrated or self.merges_observed):
            return self.switch_ms
        return self.merge_ms + self.merge_ms_per_rank * self.ctx.slot_ranks_host[slot]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def stats(self) -> dict[str, object]:
        return {"mode": self.current.mode.value, "merged_slot": self.current.slot, "switches": self.switches,
                "switch_ms": round(self.switch_ms, 3), "merge_ms": round(self.merge_ms, 3),
                "merge_ms_per_rank": round(self.merge_ms_per_rank, 4), "merges_observed": self.merges_observed,
                "call_ms": round(self.call_ms, 4),
                "segment_ms": round(self.segment_ms, 4), "token_ms": round(self.token_ms, 5),
                "base_step_ms": None if self.base_step_ms is None else round(self.base_step_ms, 3),
                "base_step_tokens": self.base_step_tokens,
                "mode_steps": dict(self.mode_steps)}

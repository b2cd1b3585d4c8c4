"""The batched engine: K trials train at once in `Stack`s; Optuna decides on an in-memory mirror.

Each fill asks the mirror for trials until K slots are busy (queued trials first), hands them to
the writer process, which creates them RUNNING in storage, and starts training them at once.
After every epoch each slot's validation MSE is reported to the mirror and the pruner decides;
about once a second the new values go to the writer, so storage (and optuna-dashboard) shows
live curves; a trial that ends is told to the mirror and handed to the writer whole (state,
value, attrs, a new best's weights). A pruned, diverged or finished slot is replaced at the next
epoch by a newly asked trial (fresh weights, reset optimizer state), so the device never idles
while the budget lasts. Every write is the writer's: the trainer waits only at the end of its
budget, for the writer to confirm the trials it started (one it could not store is replaced).
Ctrl-C / SIGTERM end the trials still training as FAIL with their curves.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import datetime

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from study.config import StudyConfig, TrainConfig, models_at_once
from study.run import interrupt
from study.run.batched import rungs
from study.run.batched.messages import (
    Curves,
    Dropped,
    Failed,
    Finish,
    Lost,
    Queued,
    Reply,
    Start,
    Started,
    Starts,
    Synced,
    Written,
)
from study.run.batched.mirror import Mirror
from study.run.batched.stack import Capture, Slot, Stack, cuda_graph, empty_slot, new_slot
from study.run.batched.sync import SYNC_S
from study.run.batched.writer import Writer, WriterError
from study.run.ledger import Ledger
from study.run.opening import Run
from study.store import Store
from study.store.recovery import fail_and_retry, stored_trial
from study.trial import objectives, pareto
from study.trial.attrs import (
    EXHAUSTED,
    MAX_LOST,
    SEED_STREAM,
    fresh_stream,
    outcome,
    repeat_reason,
    start_attrs,
    trial_configs,
    trial_seed,
)
from study.trial.data import make_data
from study.trial.model import n_params
from study.trial.space import grid_started
from study.trial.train import EpochLog, TrainResult, divergence, lr_at, mse
from study.views.artifacts import model_state
from study.views.tracking import trial_metrics

FLUSH_S = 1.0  # intermediate values go to the writer at most this long after their epoch


@dataclass
class Live:
    """What the engine keeps for a slot's trial while it trains."""

    trial: optuna.Trial  # in the mirror
    queued: Queued | None  # the stored WAITING trial it took, if any
    started: datetime
    values: dict[int, float] = field(default_factory=dict)  # epoch -> validation MSE
    flushed: int = 0  # epochs already handed to the writer
    # TensorBoard points, wall time
    epochs: list[tuple[EpochLog, float]] = field(default_factory=list)
    best_val: float = math.inf  # the best of the trial's (mean) validation curve so far
    diverged: bool = False  # a repeat's training loss went non-finite
    compute: float = 0.0  # its slots' share of their stacks' epochs, in seconds
    reported: int = 0  # epochs already reported to the mirror
    ask_at: float = 1  # the next epoch at which the pruner may act (rungs.py)
    n_params: int = 0  # its network's size (a second objective)


@dataclass
class Stats:
    # sampler and pruner in the training loop, plus the final wait for the writer
    book_seconds: float = 0.0


Shape = tuple  # a stack's: optimizer, depth, width class (and, fixed, activation)


def _shape(slot: Slot, fixed: bool = False) -> Shape:
    """Stack by optimizer kind, depth and width class (<= 32, <= 64, then powers of two), so
    little compute goes to padding (measured: docs/design.md, "The batched engine").
    Fixed-capacity stacks also by activation: a new trial then fits any free slot of its stack
    (a slot keeps the activation group it was built in)."""
    w = max(slot.cfg.widths)
    shape = slot.cfg.optimizer, slot.cfg.depth, 32 if w <= 32 else 1 << (w - 1).bit_length()
    return (*shape, slot.cfg.activation) if fixed else shape


def _capture(device: torch.device) -> Capture | None:
    """How a fixed-capacity stack runs its epochs: on a GPU one captured CUDA graph, replayed
    while the stack keeps its buffers (kernel launches are a GPU trial's cost); on the CPU,
    where arithmetic is, eagerly."""
    return cuda_graph if device.type == "cuda" else None


# (trial, its number) -> one config per repeat
Configure = Callable[[optuna.Trial, int], list[TrainConfig]]


def run_batched(
    run: Run,
    *,
    seed: int,
    on_trial: Callable[[int, TrialState, float | None], None] | None = None,
    on_writer: Callable[[int], None] = lambda pid: None,
    configure: Configure | None = None,
    publish: bool = True,
    worker: int = 0,
    stream: int = 0,
) -> float:
    """One batched engine on the run's device until its budget is spent. Returns its
    bookkeeping seconds. The caller handles signals (interrupt.handle_signals). `configure`:
    what a trial trains (default: the study's search space, `cfg.repeats` seeds, each trial's
    seeds its own); `publish`: update the study note at the end; `worker`: its index in the
    run's budget; `stream`: where it counts its trials' seeds from (trial_attrs.trial_seed)."""
    cfg, device, budget = run.cfg, run.device, run.budget
    study = optuna.load_study(study_name=cfg.study, storage=run.store.optuna)
    engine = BatchedEngine(
        cfg,
        study.get_trials(deepcopy=False),
        device,
        slots=models_at_once(cfg, device.type),
        seed=seed,
        on_trial=on_trial or (lambda number, state, value: None),
        configure=configure,
        stream=stream,
    )
    try:
        engine.run(budget, run.store, on_writer=on_writer, publish=publish, worker=worker)
    except WriterError:
        engine.settle(run.store, study, budget, worker)
        raise
    return engine.stats.book_seconds


class BatchedEngine:
    def __init__(
        self,
        cfg: StudyConfig,
        stored: list[FrozenTrial],
        device: torch.device,
        *,
        slots: int,
        seed: int,
        on_trial: Callable[[int, TrialState, float | None], None],
        configure: Configure | None = None,
        stream: int = 0,
    ):
        self.cfg, self.device, self.k = cfg, device, slots
        self.fixed = cfg.stacks == "fixed"  # fixed-capacity stacks, refilled in place
        self.multi = objectives.multi(cfg)  # two objectives: MSE and size
        # The study's own trials: each its own seeds, checked by the writer (compare's cells
        # share their seeds on purpose).
        self.unique_seeds = configure is None
        self.configure = configure or (lambda trial, seed: trial_configs(cfg, trial, seed))
        self.seed_base = stream * SEED_STREAM  # trial k trains with seed + S*(k + seed_base)
        self.on_trial = on_trial
        self.data = make_data(cfg.data, device)
        self.stacks: dict[Shape, Stack] = {}
        self.stats = Stats()
        self.writer: Writer | None = None
        # stacks whose slots changed since their build
        self.dirty: set[Shape] = set()
        self.mirror = Mirror(cfg, stored, seed=seed)
        self.rungs = rungs.schedule(self.mirror.study.pruner)
        self.last_flush = time.monotonic()
        # A trial's handle is its number in the mirror (messages.py), until the writer says
        # which number storage gave it; its life from the ask to its stored end is the ledger's.
        best = min(
            (t.values[0] for t in stored if t.state == TrialState.COMPLETE), default=math.inf
        )
        self.ledger = Ledger(cfg.max_retries, stored_best=best)
        self.said_exhausted = False

    # ---------------------------------------------------------------- the loop

    def run(
        self,
        budget,
        store: Store,
        on_writer: Callable[[int], None] = lambda pid: None,
        publish: bool = True,
        worker: int = 0,
    ) -> int:
        """Train until the budget is spent. Returns the interrupting signal, or 0. Returns only
        when every finished trial is stored; unless interrupted (or `publish` is False), the
        writer then updates the study note the dashboard shows."""
        self.worker = worker
        self.writer = Writer(self.cfg, store, self.mirror.known, budget, worker=worker)
        on_writer(self.writer.proc.pid)
        clean = False
        threads = torch.get_num_threads()
        if self.device.type == "cpu" and threads > 1:
            # Leave the writer process a core. Torch's OpenMP threads spin at every parallel
            # region's barrier, so one of them descheduled by the writer slows every epoch.
            torch.set_num_threads(threads - 1)
        try:
            while True:
                self._messages(self.writer.poll())
                self._fill(budget)
                if not self.stacks:
                    if interrupt.requested() or not (
                        self.ledger.unsettled()
                        or self._awaiting_retry(budget)
                        or self._held_by_share(budget)
                    ):
                        break
                    # The budget looks spent, but the writer has not confirmed every start and
                    # finish yet (one it could not store gives its claim back), or a crashed
                    # worker's retry has a claim reserved and the mirror has not seen it yet,
                    # or a claim is left that only another worker may take yet: wait for them.
                    t0 = time.perf_counter()
                    time.sleep(0.05)
                    self.stats.book_seconds += time.perf_counter() - t0
                    continue
                self._end(self._epoch())
                self._flush()
                if interrupt.requested():
                    self._abandon()
                    break
            clean = True
        finally:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            messages = self.writer.close(
                publish=publish and clean and not interrupt.requested(),
                interrupted=bool(interrupt.requested()),
            )
            self.stats.book_seconds += time.perf_counter() - t0
        self._messages(messages)
        return interrupt.requested()

    def _epoch(self) -> list[tuple[Shape, list[int], TrialState, str | None]]:
        """One epoch of every stack; returns the trials that end with it."""
        # sorted: the same order in every process (str hashing is salted per process), so the
        # mirror sees reports and tells in the same order and a seed repeats
        ended: list[tuple[Shape, list[int], TrialState, str | None]] = []
        for shape in sorted(self.stacks):
            stack = self.stacks[shape]
            t0 = time.perf_counter()
            loss, val = stack.train_epoch()
            loss, val = loss.tolist(), val.tolist()  # one sync per stack per epoch
            # the epoch's time split evenly: the slots of a stack have one padded shape
            share = (time.perf_counter() - t0) / stack.members
            for x in stack.slots:
                if not x.empty:
                    x.tag.compute += share
            ended += [(shape, *e) for e in self._after_epoch(shape, loss, val)]
        return ended

    def _messages(self, messages: list[Reply]) -> None:
        lost, failed, requeue = [], [], {}
        ledger = self.ledger
        for msg in messages:
            match msg:
                case Started(handle, number):
                    if (seed := ledger.started(handle, number)) is not None:
                        self.mirror.seeds[number] = seed
                case Lost(handle, _, collided, waiting):
                    entry = ledger.lost(handle, collided=collided, waiting=waiting)
                    if waiting:
                        requeue[handle] = entry
                    else:
                        lost.append(handle)
                    if collided:  # another engine has its parameter set or seed: move away
                        self.mirror.collided()
                        self.seed_base = fresh_stream()
                case Written(handle, number, state, value):
                    ledger.written(handle)
                    self.on_trial(number, state, value)
                case Dropped(handle):
                    ledger.dropped(handle)
                case Failed(handle, _):
                    ledger.failed(handle)
                    failed.append(handle)
                case Synced(trials):
                    ledger.syncs += 1
                    self.mirror.apply(trials)
        if lost or requeue:
            self._drop(set(lost) | set(requeue), requeue=set(requeue))
        for entry in requeue.values():  # whether it still trains or has ended here already
            self.mirror.requeue(entry.trial, entry.queued)
        if failed:
            self._drop(set(failed), failed=True)

    def settle(self, store: Store, study: optuna.Study, budget, worker: int) -> None:
        """The writer died: fail and retry at once the stored trials it held (those it stored
        finished before it died count), and give their budget back, and that of trials whose
        start it never confirmed (a sweep recovers them if they were stored). A held trial
        another process failed meanwhile (a sweep that queued its retry) counts for nothing
        either: its claim goes back for the retry, as the writer's sync would have done."""
        retries = self.cfg.max_retries
        self.ledger.settle(
            lambda number: fail_and_retry(store, study, number, retries) or _failed(study, number),
            budget,
            worker=worker,
        )

    def _exhausted(self) -> bool:
        """Every proposal lately was another engine's already (a search space small enough
        for the engines to have trained all of it): stop asking rather than ask forever."""
        if self.ledger.collisions >= MAX_LOST and not self.said_exhausted:
            self.said_exhausted = True
            print(EXHAUSTED, file=sys.stderr)
        return self.ledger.collisions >= MAX_LOST

    def _first_seed(self, trial: optuna.Trial, queued: Queued | None) -> int:
        """The seed a trial's first repeat trains with (trial_attrs.trial_configs): a retry
        trains with the seeds of the trial it repeats (unless another trial holds them: a
        trial whose seed was stored unchecked, by an older sinstudy); any other trial with its
        engine's count."""
        own = trial_seed(self.cfg, trial.number + self.seed_base)
        if queued is None:
            return own
        failed = self.mirror.retried(trial)
        seed = self.mirror.seeds.get(failed) if failed is not None else None
        return self.ledger.first_seed(own, queued.trial_id, seed)

    def _held_by_share(self, budget) -> bool:
        """The run's budget has trials left that this engine could not claim (its worker is at
        its share): another worker will start them, or end and free the shares (Budget.spent).
        Not when this engine has stopped asking (a grid done, a space exhausted)."""
        return not (budget.spent() or self._exhausted() or self._grid_started())

    def _awaiting_retry(self, budget) -> bool:
        """A claim reserved for a queued retry is waited for a few syncs (Ledger)."""
        return self.ledger.awaiting_retry(budget.reserved(), budget.unreserve, SYNC_S)

    def _drop(
        self, handles: set[int], *, failed: bool = False, requeue: Collection[int] = ()
    ) -> None:
        """Trials the writer could not start, or (`failed`) that were failed in storage from
        outside while they trained (another engine's sweep, optuna-dashboard's "Fail trial"):
        the writer gave their budget back; those still training stop and leave their stacks,
        and the next fill replaces them. `requeue`: queued trials the writer left WAITING
        because another trial holds their seeds (the mirror asks them again, `_messages`)."""
        for shape, stack in list(self.stacks.items()):
            gone = [
                k
                for k, x in enumerate(stack.slots)
                if not x.empty and x.tag.trial.number in handles
            ]
            for live in _trials(stack.slots[k] for k in gone):
                self._report(live)
                if failed:
                    self.mirror.tell(live.trial, None, TrialState.FAIL)
                elif live.trial.number not in requeue:
                    self.mirror.lost(live.trial, live.queued)
            if gone:
                self._remove(shape, set(gone))

    def _fill(self, budget) -> None:
        live = sum(s.members for s in self.stacks.values())
        new: dict[Shape, list[Slot]] = {}
        starts: list[Start] = []
        t0, init = time.perf_counter(), 0.0
        while (
            live + self.cfg.repeats <= self.k
            and not interrupt.requested()
            and not self._grid_started()
            and not self._exhausted()
            and budget.claim(queued=bool(self.mirror.waiting), worker=self.worker)
        ):
            self.writer.claimed()
            start, tcfgs, tag = self._ask()
            starts.append(start)
            t1 = time.perf_counter()
            for tcfg in tcfgs:
                slot = new_slot(tcfg, self.device, tag=tag)
                new.setdefault(_shape(slot, self.fixed), []).append(slot)
            init += time.perf_counter() - t1
            live += len(tcfgs)
        if starts:
            self.writer.put(Starts(starts))
        # a network's initialisation is training, as inside the standard engine's train()
        self.stats.book_seconds += time.perf_counter() - t0 - init
        self._restack(new)

    def _ask(self) -> tuple[Start, list[TrainConfig], Live]:
        """A new trial from the mirror (a queued one first): its start for the writer, what its
        repeats train, and what the engine keeps for it while it trains (its slots' tag)."""
        trial, queued = self.mirror.ask()
        tcfgs = self.configure(trial, self._first_seed(trial, queued))
        self.ledger.hand_over(trial.number, tcfgs[0].seed, queued, trial)
        now = datetime.now()
        frozen = FrozenTrial(
            number=trial.number,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=now,
            datetime_complete=None,
            params=dict(trial.params),
            distributions=dict(trial.distributions),
            user_attrs=start_attrs("batched", tcfgs[0], trial.params, len(tcfgs)),
            system_attrs=self.mirror.system_attrs(trial),
            intermediate_values={},
            trial_id=0,
        )
        start = Start(
            trial.number,
            frozen,
            queued=queued.trial_id if queued else None,
            seed=tcfgs[0].seed if self.unique_seeds else None,
        )
        tag = Live(trial, queued, now, n_params=frozen.user_attrs["n_params"])
        if self.multi:  # what the Pareto pruner ranks it by, beside its MSE
            trial.set_user_attr(pareto.SIZE_ATTR, tag.n_params)
        tag.ask_at = self.rungs.next_ask(self.mirror.study, self.mirror.frozen(trial), 0)
        return start, tcfgs, tag

    def _restack(self, new: dict[Shape, list[Slot]]) -> None:
        """One restack per changed stack per epoch: the slots that left (already unstacked in
        _end) and the ones that arrive (`new`) are applied together."""
        for shape in sorted(set(new) | self.dirty):
            if self.fixed:
                self._place(shape, new.get(shape, []))
                continue
            stack = self.stacks.get(shape)
            if stack is None:
                self.stacks[shape] = Stack(new[shape], self.data)
                continue
            if shape not in self.dirty:
                stack.unstack()
            stack.slots += new.get(shape, [])
            if stack.slots:
                stack.build()
            else:
                del self.stacks[shape]
        self.dirty.clear()

    def _place(self, shape: Shape, newcomers: list[Slot]) -> None:
        """Fixed capacity: newcomers take free slots of their shape's stack in place; a stack
        that has too few is rebuilt once with room for twice its members (new buffers), and a
        shape without one gets a stack with room to spare."""
        if not newcomers:
            return
        stack = self.stacks.get(shape)
        free = stack.free() if stack else []
        if stack is not None and len(newcomers) <= len(free):
            for k, slot in zip(free, newcomers, strict=False):
                stack.refill(k, slot)
            return
        members = newcomers
        if stack is not None:
            stack.unstack()
            members = [x for x in stack.slots if not x.empty] + newcomers
        room = max(len(members), min(self.k, 1 << len(members).bit_length()))
        layout = (shape[1], shape[2])
        spare = [
            empty_slot(members[0].cfg, layout, self.device) for _ in range(room - len(members))
        ]
        self.stacks[shape] = Stack(
            members + spare, self.data, layout=layout, capture=_capture(self.device)
        )

    def _after_epoch(
        self, shape: Shape, loss: list[float], val: list[float]
    ) -> list[tuple[list[int], TrialState, str | None]]:
        """Report each trial's epoch (the mean over its repeats' slots) to the mirror; returns the
        trials that end now, as (their slots, state, reason)."""
        stack = self.stacks[shape]
        # each trial's slots and the mean of their validation MSE
        means = [(ks, sum(val[k] for k in ks) / len(ks)) for ks in _members(stack).values()]
        improved = [False] * len(stack.slots)
        for ks, mean in means:
            if mean < stack.slots[ks[0]].tag.best_val:
                for k in ks:
                    improved[k] = True
        if any(improved):  # every repeat keeps its weights of the epoch where the mean was best
            stack.keep_best(torch.tensor(improved, device=self.device))
        t0 = time.perf_counter()
        now = time.time()
        done: list[tuple[list[int], TrialState, str | None]] = []
        for ks, mean in means:
            first = stack.slots[ks[0]]
            live: Live = first.tag
            epoch, lr = first.epoch, lr_at(first.cfg, first.epoch - 1)
            if improved[ks[0]]:
                live.best_val = mean
                for k in ks:
                    stack.slots[k].best_val, stack.slots[k].best_epoch = val[k], epoch
            bad = [k for k in ks if not math.isfinite(loss[k])]
            if bad:
                live.diverged = True
                seed = stack.slots[bad[0]].cfg.seed
                done.append(
                    (ks, TrialState.PRUNED, repeat_reason(divergence(epoch, lr), seed, len(ks)))
                )
                continue
            live.values[epoch] = mean
            for k in ks:
                stack.slots[k].last_val = val[k]
            live.epochs.append(
                (EpochLog(epoch, sum(loss[k] for k in ks) / len(ks), mean, lr), now)
            )
            if epoch >= live.ask_at:  # elsewhere the pruner would say no and change nothing
                self._report(live)
                if objectives.should_prune(live.trial):
                    done.append((ks, TrialState.PRUNED, f"pruner stopped it after epoch {epoch}"))
                    continue
                live.ask_at = self.rungs.next_ask(
                    self.mirror.study, self.mirror.frozen(live.trial), epoch
                )
            if epoch >= first.cfg.max_epochs:
                done.append((ks, TrialState.COMPLETE, None))
        self.stats.book_seconds += time.perf_counter() - t0
        return done

    def _report(self, live: Live) -> None:
        """Report to the mirror the epochs since the last report: before the pruner is asked
        and before the trial is told, the only times they are read."""
        if len(live.values) > live.reported:
            for epoch, mean in list(live.values.items())[live.reported :]:
                objectives.report(live.trial, mean, epoch)
            live.reported = len(live.values)

    def _flush(self) -> None:
        """Every FLUSH_S: the epochs since the last flush, of every training trial, in one job."""
        now = time.monotonic()
        if now - self.last_flush < FLUSH_S:
            return
        self.last_flush = now
        out = {}
        for stack in self.stacks.values():
            for live in _trials(stack.slots):
                if len(live.values) > live.flushed:
                    out[live.trial.number] = dict(list(live.values.items())[live.flushed :])
                    live.flushed = len(live.values)
        if out:
            self.writer.put(Curves(out))

    def _end(self, ended: list[tuple[Shape, list[int], TrialState, str | None]]) -> None:
        """Tell and hand over the trials that ended this epoch; take them out of their stacks."""
        t0 = time.perf_counter()

        # Trials that end in the same epoch have no order of their own: complete ones go first,
        # best first, so at most one of them is a new best (its artifacts are a write each).
        def order(e):
            shape, ks, state, _ = e
            return (
                state != TrialState.COMPLETE,
                self.stacks[shape].slots[ks[0]].tag.best_val
                if state == TrialState.COMPLETE
                else 0.0,
            )

        for shape, ks, state, reason in sorted(ended, key=order):
            self._finish(self.stacks[shape], ks, state, reason)
        self.stats.book_seconds += time.perf_counter() - t0
        for shape in {e[0] for e in ended}:
            self._remove(shape, {k for sh, ks, _, _ in ended if sh == shape for k in ks})

    def _remove(self, shape: Shape, gone: set[int]) -> None:
        stack = self.stacks[shape]
        if self.fixed:  # their slots free for the next trials of the shape, in place
            for k in gone:
                stack.vacate(k)
            if not stack.members:
                del self.stacks[shape]
            return
        if shape not in self.dirty:
            stack.unstack()
        stack.slots = [x for k, x in enumerate(stack.slots) if k not in gone]
        self.dirty.add(shape)  # rebuilt in _fill, together with the newcomers

    # ---------------------------------------------------------------- one trial to storage

    def _finish(self, stack: Stack, ks: list[int], state: TrialState, reason: str | None) -> None:
        """Close a trial (its repeats' slots `ks`) as the standard engine would: same attrs,
        value, curve, artifacts."""
        live: Live = stack.slots[ks[0]].tag
        diverged = live.diverged
        out = None
        if state == TrialState.COMPLETE or diverged:
            out = outcome(
                [self._result(stack, k, diverged) for k in ks], [stack.slots[k].cfg for k in ks]
            )
        attrs = dict(out.attrs) if out else {}
        if out:  # trained alongside others: its own time is its share, not its start-to-end
            attrs["compute_seconds"] = round(live.compute, 4)
        if reason:
            attrs["pruned_reason"] = reason
        last = live.values[max(live.values)] if live.values else None
        # Optuna: a pruned trial keeps its last value (of one objective; of two, none)
        value = live.best_val if state == TrialState.COMPLETE else last
        metrics = trial_metrics(value, {"n_params": live.n_params, **attrs})
        if self.multi and state != TrialState.COMPLETE:
            value = None
        # Weights go with every trial better than the best confirmed stored; the writer uploads
        # those of the trials that are best when it stores them. Decided here against trials
        # still on their way, a trial handed over without weights stayed without them when the
        # better one on its way was then not stored (failed meanwhile by another engine).
        new_best = state == TrialState.COMPLETE and value < self.ledger.stored_best
        self._report(live)  # a pruned trial's value is its last one; TPE reads pruned curves
        # what storage holds: [MSE] or [MSE, n_params] for a complete trial, else nothing
        stored = (
            objectives.values(self.cfg, value, live.n_params)
            if state == TrialState.COMPLETE
            else None
        )
        told = None if stored is None else stored if self.multi else value
        self.mirror.tell(live.trial, told, state)
        model = (
            (model_state(out.model), out.model_cfg) if new_best else (None, stack.slots[ks[0]].cfg)
        )
        self._put(
            live, state, value, attrs, metrics, *model, rest=tuple(stored[1:]) if stored else ()
        )

    def _put(
        self,
        live: Live,
        state: TrialState,
        value,
        attrs: dict,
        metrics: dict,
        model,
        tcfg,
        rest: tuple[float, ...] = (),
    ) -> None:
        self.ledger.ended(live.trial.number, value if state == TrialState.COMPLETE else math.inf)
        self.writer.put(
            Finish(
                handle=live.trial.number,
                state=state,
                value=value,
                values=dict(list(live.values.items())[live.flushed :]),
                attrs=attrs,
                system_attrs=self.mirror.system_attrs(live.trial),
                completed=datetime.now(),
                epochs=live.epochs,
                metrics=metrics,
                model=model,
                tcfg=tcfg,
                rest=rest,
            )
        )

    def _grid_started(self) -> bool:
        return self.cfg.sampler == "grid" and grid_started(self.mirror.study, self.cfg.space)

    def _result(self, stack: Stack, k: int, diverged: bool) -> TrainResult:
        """What train() returns for this slot, from the stack's best and final weights."""
        x = stack.slots[k]
        live: Live = x.tag
        best, final = stack.slot_model(k, "best"), stack.slot_model(k, "final")
        d = self.data
        return TrainResult(
            best_val_mse=x.best_val,
            best_epoch=x.best_epoch,
            final_val_mse=x.last_val,
            test_mse=mse(best, d.x_test, d.y_test) if x.best_epoch else math.inf,
            final_test_mse=math.inf if diverged else mse(final, d.x_test, d.y_test),
            epochs=x.epoch - 1 if diverged else x.epoch,
            n_params=n_params(final),
            seconds=(datetime.now() - live.started).total_seconds(),
            device=str(self.device),
            diverged=None,
            model=best,
        )

    def _abandon(self) -> None:
        """Interrupted: write every training trial as FAIL with the curve it has."""
        for stack in self.stacks.values():
            for live in _trials(stack.slots):
                x = next(x for x in stack.slots if x.tag is live)
                self._report(live)
                self.mirror.tell(live.trial, None, TrialState.FAIL)
                self._put(
                    live, TrialState.FAIL, None, {"failed_reason": "interrupted"}, {}, None, x.cfg
                )
        self.stacks.clear()


def _failed(study: optuna.Study, number: int) -> bool:
    """Is stored trial `number` FAIL (failed by another process, since this one holds it)?"""
    trial = stored_trial(study, number)
    return trial is not None and trial.state == TrialState.FAIL


def _trials(slots) -> list[Live]:
    """The trials of these slots, each once (a trial's repeats share their Live), in slot order."""
    return list({id(x.tag): x.tag for x in slots if not x.empty}.values())


def _members(stack: Stack) -> dict[int, list[int]]:
    """Each trial's slots in the stack (a trial's repeats always share one: same shape)."""
    out: dict[int, list[int]] = {}
    for k, x in enumerate(stack.slots):
        if not x.empty:
            out.setdefault(id(x.tag), []).append(k)
    return out

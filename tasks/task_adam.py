"""Per-task AdamW for shared weights: every task keeps its own Adam moments for the backbone's
parameters and the step is the SUM of the tasks' AdamW updates (``MultiTaskModule(shared_adam='per_task')``).

Why. One AdamW over the summed loss divides every coordinate by the second moment of the SUM of the
tasks' gradients. Measured on the quickstart multi-task trunk after 1000 joint-AdamW steps
(``python scripts/task_gradients.py --ckpt RUN``, README "Single task vs multi-task"): the four tasks' trunk gradients
are nearly orthogonal (|cos| < 0.06) but their sizes differ up to 25x per block (CTC's dominate the
first blocks, the diffusion loss's are the smallest), so in the shared blocks the diffusion task
moved the weights a small fraction of what it does alone. One scalar per task (static or uncertainty
loss weights) cannot undo a per-coordinate imbalance. With per-task moments every task moves the
shared weights as far as AdamW would move them for that task alone, and loss weights no longer
scale the loss (Adam is scale invariant): they scale each task's step on the shared weights. With
one task of weight 1 this is exactly AdamW.

How. Nothing in torch or Lightning separates the per-task gradients of shared weights inside ONE
backward pass, so it is written here: while a task's loss is built (:meth:`TaskGradients.capture`),
each shared parameter is replaced by a tap, an identity autograd node (the way
``torch.func.functional_call`` swaps parameters), whose backward records that task's gradient and
passes it on unchanged. ``p.grad`` still receives the sum (DDP reduces it as usual); the optimizer
reads the recorded per-task gradients instead, averaging them over ranks itself. Gradient clipping,
fp16 loss scaling and gradient checkpointing do not act on the recorded gradients, so the module
refuses them in this mode (bf16 autocast is fine).

Update, for every shared parameter ``p`` and every task ``t`` that reached it this step
(``g_t``, bias corrections ``c1 = 1 - b1^n_t``, ``c2 = 1 - b2^n_t``)::

    m_t = b1 m_t + (1 - b1) g_t          v_t = b2 v_t + (1 - b2) g_t^2
    p  <- p (1 - lr wd) - lr * sum_t w_t (m_t / c1) / (sqrt(v_t / c2) + eps)

``w_t`` is the task's entry of ``MultiTaskModule.loss_weights``: under Adam a loss scale cancels, so
in this mode a task's weight scales its STEP on the shared weights instead (e.g. < 1 for a task that
has converged: its normalised near-zero-mean gradients would otherwise keep stirring the trunk).

Memory: two moments per (task, shared parameter), i.e. ``tasks`` times AdamW's state for the trunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.adamw import adamw


class _Tap(torch.autograd.Function):
    """Identity on a parameter whose backward adds the incoming gradient to ``sink[param]``."""

    @staticmethod
    def forward(ctx: Any, p: Tensor, sink: dict[Tensor, Tensor]) -> Tensor:  # type: ignore[override]
        ctx.sink, ctx.param = sink, p
        return p.view_as(p)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        prev = ctx.sink.get(ctx.param)
        ctx.sink[ctx.param] = grad.detach().clone() if prev is None else prev.add_(grad.detach())
        return grad, None


class TaskGradients:
    """Records, per task, the gradients of the given (shared) parameters in an ordinary backward.

    ``modules``: the modules whose trainable parameters are shared. ``grads[task][param]`` holds the
    task's gradient after backward (accumulated over micro-batches until :meth:`pop`).
    """

    def __init__(self, modules: Iterable[nn.Module], tasks: Iterable[str]) -> None:
        self.tasks = list(tasks)
        self.slots: list[tuple[nn.Module, str, nn.Parameter]] = []
        for module in modules:
            for sub in module.modules():
                for name, p in sub._parameters.items():
                    if p is not None and p.requires_grad:
                        self.slots.append((sub, name, p))
        self.params = list({id(p): p for _, _, p in self.slots}.values())
        self.grads: dict[str, dict[Tensor, Tensor]] = {task: {} for task in self.tasks}

    @contextmanager
    def capture(self, task: str) -> Iterator[None]:
        """Within this block the shared parameters are taps recording ``task``'s gradient."""
        sink = self.grads[task]
        swapped = []
        try:
            for module, name, p in self.slots:
                if module._parameters.get(name) is p:
                    module._parameters[name] = _Tap.apply(p, sink)  # type: ignore[assignment]
                    swapped.append((module, name, p))
            yield
        finally:
            for module, name, p in swapped:
                module._parameters[name] = p

    def pop(self, p: Tensor) -> dict[str, Tensor]:
        """``{task: gradient}`` recorded for ``p`` since the last pop (and forget them)."""
        return {task: sink.pop(p) for task, sink in self.grads.items() if p in sink}

    def clear(self) -> None:
        for sink in self.grads.values():
            sink.clear()

    def all_reduce(self) -> None:
        """Average every task's recorded gradients over the ranks that recorded them (a no-op
        without torch.distributed). Every rank issues the same collectives: one per task for the
        presence flags and one for the flattened gradients."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for task in self.tasks:
            sink = self.grads[task]
            present = torch.tensor([float(p in sink) for p in self.params], device=self.params[0].device)
            flat = torch.cat([sink[p].reshape(-1) if p in sink else torch.zeros(p.numel(), device=p.device,
                                                                               dtype=p.dtype)
                              for p in self.params])
            dist.all_reduce(present)
            dist.all_reduce(flat)
            offset = 0
            for p, count in zip(self.params, present.tolist()):
                n = p.numel()
                if count > 0:
                    sink[p] = flat[offset:offset + n].view_as(p) / count
                offset += n


class TaskAdamW(torch.optim.Optimizer):
    """AdamW whose shared parameters (those :class:`TaskGradients` records) take the sum of one AdamW
    update per task (see the module docstring), each times its ``task_weights`` entry (default 1);
    every other parameter is plain AdamW on ``p.grad``.
    State: ``state[p]['joint'] = {step, exp_avg, exp_avg_sq}`` for plain parameters and
    ``state[p]['tasks'][task] = {step, exp_avg, exp_avg_sq}`` for shared ones (resumes exactly).

    ``fused``: step every task's parameters with torch's fused AdamW kernel (``torch.optim.adamw.adamw
    (fused=True)``: one pass over parameter, gradient and moments per tensor), one call per task with
    ``lr * w_t`` and weight decay applied once beforehand, so the sum of the tasks' updates is applied
    as consecutive in-place steps (equal up to float rounding); None (default) = where the parameters'
    device supports it (CPU, CUDA), False = the per-parameter Python loop of the update rule. Measured
    on one CPU core for the quickstart trunk (7.5 M shared parameters, 4 tasks): 91 ms a step in the
    loop, 39 ms fused (``python scripts/benchmark.py kernels``)."""

    def __init__(self, params: Any, taps: TaskGradients, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, task_weights: dict[str, float] | None = None,
                 fused: bool | None = None) -> None:
        if not lr > 0 or not eps >= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1:
            raise ValueError(f"TaskAdamW: invalid lr={lr}, eps={eps} or betas={betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.taps = taps
        self.task_weights = dict(task_weights or {})
        self.fused = fused

    @staticmethod
    def _moments(state: dict[str, Any], p: Tensor, grad: Tensor, b1: float, b2: float, eps: float) -> Tensor:
        """Advance one set of Adam moments by ``grad``; return the bias-corrected direction (the loop)."""
        TaskAdamW._init_state(state, p)
        state["step"] += 1
        n = float(state["step"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v / (1 - b2 ** n)).sqrt_().add_(eps)
        return (m / (1 - b1 ** n)).div_(denom)

    @staticmethod
    def _init_state(state: dict[str, Any], p: Tensor) -> None:
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _use_fused(self, params: list[Tensor]) -> bool:
        if self.fused is not None:
            return self.fused
        return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64, torch.bfloat16,
                                                                        torch.float16) for p in params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Also forget the recorded per-task gradients (those of a step that was skipped)."""
        super().zero_grad(set_to_none=set_to_none)
        self.taps.clear()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.taps.all_reduce()
        for group in self.param_groups:
            # (task or None for plain AdamW) -> [(parameter, its moments for that task, gradient)]
            work: dict[str | None, list[tuple[Tensor, dict[str, Any], Tensor]]] = {}
            stepped: list[Tensor] = []
            for p in group["params"]:
                per_task = self.taps.pop(p)
                if not per_task and p.grad is None:
                    continue
                state = self.state[p]
                if per_task:
                    tasks = state.setdefault("tasks", {})
                    for t, g in per_task.items():
                        work.setdefault(t, []).append((p, tasks.setdefault(t, {}), g.to(p.dtype)))
                else:  # not shared (a head's), or reached outside any captured task
                    work.setdefault(None, []).append((p, state.setdefault("joint", {}), p.grad))
                stepped.append(p)
            if stepped:
                if self._use_fused(stepped):
                    self._fused_step(group, work, stepped)
                else:
                    self._loop_step(group, work, stepped)
        return loss

    def _order(self, work: dict[str | None, Any]) -> list[str | None]:
        """Tasks in their fixed order (the order updates are summed in), plain AdamW last."""
        return [t for t in (*self.taps.tasks, None) if t in work]

    def _loop_step(self, group: dict[str, Any], work: dict[str | None, list], stepped: list[Tensor]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        updates: dict[Tensor, Tensor] = {}
        for task in self._order(work):
            weight = 1.0 if task is None else self.task_weights.get(task, 1.0)
            for p, state, g in work[task]:
                direction = self._moments(state, p, g, b1, b2, eps) * weight
                updates[p] = direction if p not in updates else updates[p] + direction
        for p in stepped:
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(updates[p], alpha=-lr)

    def _fused_step(self, group: dict[str, Any], work: dict[str | None, list], stepped: list[Tensor]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        if wd:
            torch._foreach_mul_(stepped, 1 - lr * wd)  # decoupled weight decay, once per parameter
        for task in self._order(work):
            weight = 1.0 if task is None else self.task_weights.get(task, 1.0)
            params, grads, avgs, avg_sqs, steps = [], [], [], [], []
            for p, state, g in work[task]:
                self._init_state(state, p)
                if state["step"].device != p.device:  # the fused kernel counts steps on the parameter's device
                    state["step"] = state["step"].to(p.device)
                params.append(p)
                grads.append(g)
                avgs.append(state["exp_avg"])
                avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            adamw(params, grads, avgs, avg_sqs, [], steps, fused=True, amsgrad=False, beta1=b1,
                                    beta2=b2, lr=lr * weight, weight_decay=0.0, eps=eps, maximize=False)

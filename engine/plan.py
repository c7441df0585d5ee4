"""``tandem plan``: what a run will place where on the cluster, checked before anything starts.

Knows the run's resource phases — the prompt steps (N vLLM replicas, each a placement group of
one bundle per tensor-parallel worker, packed on one node) and the weight step (Ray Train
workers: with ``relaunch`` they take the resources the killed replicas free; with ``hotswap``
they run beside the live replicas), the GRPO step (its learner actor beside the live replicas), the
evaluator actors (if any) in both, the model groups'
replicas in the phases their steps span — and places every bundle first-fit on the nodes' total
resources, as Ray's scheduler would on an idle cluster. A plan with problems makes ``run`` fail
at once with them named, and with the smallest change of flags that fits (``suggest``), instead
of waiting for resources that will never come. Does not know
autoscalers: on a cluster that adds nodes on demand, turn the check off (``plan_check: false``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

from actors import ReplicaConfig
from actors.inference import device
from actors.training.guards import worker_resources
from engine.config import RunConfig
from engine.steps.kinds import weight_keys


@dataclass(frozen=True)
class Node:
    """One alive node: its address and total resources (CPU, GPU, memory, custom)."""

    address: str
    resources: dict[str, float]


@dataclass(frozen=True)
class Placed:
    """One group of bundles (a replica or a training worker) and the node it lands on (None: nowhere)."""

    what: str
    bundles: tuple[dict[str, float], ...]
    node: str | None


@dataclass(frozen=True)
class Phase:
    """What runs at the same time."""

    name: str
    placed: tuple[Placed, ...]

    @property
    def problems(self) -> list[str]:
        return [f"{self.name}: {p.what} needs {_fmt(_sum(p.bundles))} on one node; no node has that left"
                for p in self.placed if p.node is None]


def nodes_now() -> list[Node]:
    """The alive nodes of the connected Ray cluster."""
    import ray

    return [Node(n["NodeManagerAddress"], dict(n["Resources"])) for n in ray.nodes() if n.get("Alive")]


def make_plan(cfg: RunConfig, nodes: list[Node]) -> list[Phase]:
    """The run's phases placed on ``nodes``.

    Example:
        >>> phases = make_plan(RunConfig(), [Node("10.0.0.1", {"CPU": 2.0})])
        >>> [p.name for p in phases], phases[0].problems
        (['prompt steps', 'weight step (relaunch)'], [])
    """
    rcfg = ReplicaConfig(model=cfg.model, num_cpus=cfg.cpus_per_replica, num_gpus=cfg.gpus_per_replica,
                         tensor_parallel_size=cfg.tensor_parallel_size, resources=cfg.replica_resources)
    replicas = [(f"replica {r}", tuple(device.bundles(rcfg))) for r in range(cfg.replicas)]
    worker = worker_resources(cfg.lora)
    workers = [(f"training worker {w}", (worker,)) for w in range(cfg.lora.num_workers)]
    ev = cfg.evaluators  # they live as long as the run, beside everything else
    evaluators = [(f"evaluator {e}", ({"CPU": ev.num_cpus, **ev.resources},)) for e in range(ev.count)]
    prompt_groups, weight_groups = _groups_up(cfg)
    phases = [Phase("prompt steps", _place(replicas + evaluators + prompt_groups, nodes))]
    if cfg.reinforces():  # a GRPO learner beside the live replicas (and the groups its steps' neighbours hold)
        learner = {k: v for k, v in (("CPU", cfg.grpo.learner_cpus), ("GPU", cfg.grpo.learner_gpus)) if v > 0}
        learners = [(f"grpo learner {i}", (learner,)) for i in range(cfg.grpo.learner_workers)]
        phases.append(Phase("grpo step", _place(replicas + learners + evaluators + prompt_groups, nodes)))
    if cfg.trains():
        if cfg.lifecycle == "relaunch":
            phases.append(Phase("weight step (relaunch)", _place(workers + evaluators + weight_groups, nodes)))
        else:
            phases.append(Phase("weight step (hotswap)", _place(replicas + workers + evaluators + weight_groups, nodes)))
    return phases


def _groups_up(cfg: RunConfig) -> tuple[list, list]:
    """The model groups' replicas up beside the student's replicas (every step that uses a group runs them
    together, a weight step while it bootstraps) and during the weight steps' training: a group
    is up from the first step that names it to the last, less the training of that last step when it is a
    weight step that names it as teacher (released once its traces are in: ``engine.groups``)."""
    keys, table = cfg.strategy_keys(), cfg.step_table()
    trains = weight_keys(table)
    up: tuple[list, list] = ([], [])
    for name, steps in cfg.group_uses().items():
        if not steps:
            continue
        group = cfg.models[name]
        rcfg = ReplicaConfig(model=group.model, num_cpus=group.cpus_per_replica, num_gpus=group.gpus_per_replica,
                             tensor_parallel_size=group.tensor_parallel_size, resources=group.replica_resources)
        placed = [(f"{name} replica {r}", tuple(device.bundles(rcfg))) for r in range(group.replicas)]
        alive = range(min(steps), max(steps) + 1)
        up[0].extend(placed)  # beside the student's replicas: a weight step bootstraps its traces on them too
        if any(keys[i - 1] in trains and (i < max(steps) or i not in steps) for i in alive):
            up[1].extend(placed)
    return up


def warnings(cfg: RunConfig) -> list[str]:
    """Settings that fit the cluster but are likely not what was meant."""
    out = []
    if cfg.gpus_per_replica > 0 and not cfg.lora.use_gpu and cfg.trains():
        out.append("the replicas run on GPUs but LoRA training runs on CPU: add --lora-use-gpu (lora.use_gpu: true)")
    return out


def check(phases: list[Phase], fix: str | None = None) -> None:
    """Raise ``ValueError`` naming every group that cannot be placed, and ``fix`` (see ``suggest``)."""
    problems = [p for phase in phases for p in phase.problems]
    if problems:
        advice = (f"This fits the cluster: {fix}" if fix else "Lower --replicas / --cpus-per-replica / "
                  "--gpus-per-replica / --lora-num-workers / --lora-cpus-per-worker, or add nodes")
        raise ValueError("the cluster cannot hold this run: " + "; ".join(problems) + f". {advice} "
                         "(or set plan_check: false on an autoscaling cluster)")


def suggest(cfg: RunConfig, nodes: list[Node]) -> str | None:
    """The smallest change of the run's flags that makes its plan fit ``nodes``, or None.

    Tries fewer replicas, fewer CPUs per training worker, fewer workers (counts that still divide
    the effective batch), both of the first two, the ``relaunch`` lifecycle, then a GRPO learner that
    reserves no CPU (it learns while the replicas wait), in that order.

    Example:
        >>> suggest(RunConfig(lifecycle="hotswap"), [Node("10.0.0.1", {"CPU": 2.0})])
        '--replicas 1 --lora-cpus-per-worker 1'
    """
    lora = cfg.lora
    tries: list[dict] = [{"replicas": r} for r in range(cfg.replicas - 1, 0, -1)]
    tries += [{"lora.cpus_per_worker": c} for c in range(lora.cpus_per_worker - 1, 0, -1)]
    tries += [{"lora.num_workers": w} for w in range(lora.num_workers - 1, 0, -1)
              if lora.batch_size % (lora.micro_batch_size * w) == 0]  # the effective batch stays exact
    tries += [{"replicas": r, "lora.cpus_per_worker": c} for r in range(cfg.replicas - 1, 0, -1)
              for c in range(lora.cpus_per_worker - 1, 0, -1)]
    tries += [{"lifecycle": "relaunch"}] if cfg.lifecycle != "relaunch" else []
    tries += [{"grpo.learner_cpus": 0}] if cfg.reinforces() and cfg.grpo.learner_cpus > 0 else []
    for changes in tries:
        top = {k: v for k, v in changes.items() if "." not in k}
        sections = {s: {k.split(".")[1]: v for k, v in changes.items() if k.startswith(f"{s}.")}
                    for s in ("lora", "grpo")}
        candidate = replace(cfg, **top, **{s: replace(getattr(cfg, s), **v) for s, v in sections.items() if v})
        if not any(phase.problems for phase in make_plan(candidate, nodes)):
            return " ".join(f"--{k.replace('.', '-').replace('_', '-')} {v}" for k, v in changes.items())
    return None


def describe(phases: list[Phase], nodes: list[Node]) -> str:
    """A readable plan: the nodes, then each phase's groups and where they go."""
    lines = ["nodes:"] + [f"  {n.address}: {_fmt(n.resources)}" for n in nodes]
    for phase in phases:
        lines.append(f"{phase.name}:")
        lines += [f"  {p.what}: {_fmt(_sum(p.bundles))} -> {p.node or 'NO NODE FITS'}" for p in phase.placed]
    return "\n".join(lines)


def summary(phases: list[Phase], nodes: list[Node]) -> str:
    """The plan in one line: the cluster's totals, then each phase's groups and what they take together.

    Example:
        >>> summary(make_plan(RunConfig(), [Node("10.0.0.1", {"CPU": 2.0})]), [Node("10.0.0.1", {"CPU": 2.0})])
        'plan on 1 node(s) (2 CPU): prompt steps: 2 replicas, 2 CPU; weight step (relaunch): 1 training worker, 2 CPU'
    """
    cluster = _sum(tuple(n.resources for n in nodes))
    phase = []
    for p in phases:
        kinds = Counter(q.what.rsplit(" ", 1)[0] for q in p.placed)
        groups = " + ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in kinds.items())
        phase.append(f"{p.name}: {groups}, {_fmt(_sum(tuple(b for q in p.placed for b in q.bundles)))}")
    return f"plan on {len(nodes)} node(s) ({_fmt(cluster)}): " + "; ".join(phase)


def _place(groups: list[tuple[str, tuple[dict, ...]]], nodes: list[Node]) -> tuple[Placed, ...]:
    free = [dict(n.resources) for n in nodes]
    placed = []
    for what, bundles in groups:
        need = _sum(bundles)  # STRICT_PACK: a replica's tensor-parallel bundles share one node
        index = next((i for i, f in enumerate(free) if all(f.get(k, 0.0) >= v for k, v in need.items())), None)
        if index is not None:
            for k, v in need.items():
                free[index][k] -= v
        placed.append(Placed(what, bundles, None if index is None else nodes[index].address))
    return tuple(placed)


def _sum(bundles: tuple[dict, ...]) -> dict[str, float]:
    total: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            total[k] = total.get(k, 0.0) + v
    return {k: v for k, v in total.items() if v}


def _fmt(resources: dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU") if k in resources] + sorted(
        k for k in resources if k not in ("CPU", "GPU") and not k.startswith(("node:", "memory", "object_store")))
    return ", ".join(f"{resources[k]:g} {k}" for k in keys) or "nothing"

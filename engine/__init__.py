"""The driver: strategies, steps, evaluation fan-out, run dirs, reports, CLI. Issues calls to actors only.

Rooms (a lower one never imports a higher one; none imports torch or vllm at module level):

- ``engine.adapters``: how prompts are written and answers read (``chat``, ``json``,
  ``constrained``). Imports ``actors.dspy_side.client`` for the structured-output key only.
- ``engine.store``: the run dir's one typed reader and writer (``RunStore``), program JSON
  through a validating loader, ``storage:`` push and pull. Imports nothing of the engine.
- ``engine.steps``: the step kinds, one per file, one protocol (``compile(program, *, trainset,
  valset=None, ...)``): ``prompt`` (BFRS, the ``p`` step), ``weight`` (LoRA, the ``w`` step), and
  ``bootstrap`` (traces both use). Imports ``evaluate`` and ``actors``.
- beside them: ``strategy`` (parsing), ``evaluate`` (program runs fanned out over threads or
  evaluator actors), ``held_out`` (test-split scores), ``config`` (``RunConfig``), ``plan`` (what a
  run needs of the cluster), ``console``, ``better_together`` (runs a strategy's steps), ``run``
  (one run end to end).
- ``engine.report``: the run's report and MLflow tracking. ``engine.table``: ``tandem table``
  (config and cells, runner, report files).
- ``cli`` on top: the ``tandem`` command.
"""

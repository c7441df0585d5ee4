"""What limits the embedded default on Iris: the model, or the traces it is fine-tuned on?

Every strategy of the embedded default's table ends with a program that answers one class to all
50 test inputs (benchmarks/RESULTS.md), and its weight step trains on that program's passing
traces, which are then one class too. This benchmark gives the same weight step (the run's
defaults: ``WeightStep`` with ``RunConfig().lora``, relaunch, the constrained adapter, vanilla
prompts) good traces instead, through ``compile(teacher=...)``: the teacher is the Iris program on
a scripted LM that writes the textbook rule (petal length < 2.5 cm: setosa; else petal width <
1.75 cm: versicolor; else virginica) as its reasoning and answer, in exactly the layout the
constrained decoder allows (checked against the regex of every call). The student, SmolLM2-135M on
2 vLLM-CPU replicas, is scored on the held-out test split before and after. If the tuned student
answers more than one class and beats the one-class share, the limit is the data bootstrapping
gives the weight step, not the model; if not, the model and budget are.

    python benchmarks/iris_teacher.py --seeds 0 --epochs 2,4

Prints a table and writes JSON (benchmarks/out/iris_teacher.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from dataclasses import asdict, replace
from pathlib import Path

import dspy
from dspy import lm15

from actors import PoolConfig, ReplicaConfig, ReplicaPool, connect
from actors.dspy_side.provider import pool_lm
from actors.dspy_side.client import STRUCTURED_KEY
from engine.adapters.registry import make_adapter, stop_for
from engine.config import RunConfig
from engine.held_out import score_held_out
from engine.steps.weight import WeightStep
from programs import iris

FIELDS = ("petal_length", "petal_width", "sepal_length", "sepal_width")


def rule(petal_length: float, petal_width: float) -> tuple[str, str]:
    """The textbook Iris rule: (reasoning, species)."""
    if petal_length < 2.5:
        return f"The petal length is {petal_length} cm, under 2.5 cm, so it is setosa.", "setosa"
    if petal_width < 1.75:
        return (f"The petal length is {petal_length} cm, 2.5 cm or more, and the petal width is {petal_width} cm, "
                "under 1.75 cm, so it is versicolor."), "versicolor"
    return (f"The petal length is {petal_length} cm, 2.5 cm or more, and the petal width is {petal_width} cm, "
            "1.75 cm or more, so it is virginica."), "virginica"


class RuleEngine:
    """A dspy.LM engine that answers an Iris prompt with ``rule``, in ChatAdapter's layout, and
    checks that the completion is one the constrained decoder would allow."""

    supports_structured_outputs = True

    def __init__(self):
        self.calls = 0

    def complete(self, request: lm15.Request) -> lm15.Response:
        prompt = request.messages[-1].text
        values = {f: float(re.search(rf"\[\[ ## {f} ## \]\]\n([-\d.]+)", prompt).group(1)) for f in FIELDS}
        reasoning, answer = rule(values["petal_length"], values["petal_width"])
        text = f"[[ ## reasoning ## ]]\n{reasoning}\n\n[[ ## answer ## ]]\n{answer}\n\n[[ ## completed ## ]]\n"
        constraint = ((request.config.extensions or {}).get("metadata") or {}).get(STRUCTURED_KEY, {})
        if "regex" in constraint and not re.fullmatch(constraint["regex"], text):
            raise AssertionError(f"the rule's completion is not one the constrained decoder allows: {text!r}")
        self.calls += 1
        return lm15.Response(id=None, model=request.model, message=lm15.Message.assistant(text),
                             finish_reason="stop", usage=lm15.Usage(input_tokens=1, output_tokens=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="comma-separated data seeds")
    ap.add_argument("--epochs", default="2", help="comma-separated LoRA epochs to try (default: the run's 2)")
    ap.add_argument("--train-size", type=int, default=30)
    ap.add_argument("--out", default="benchmarks/out/iris_teacher.json")
    args = ap.parse_args()

    base = RunConfig()
    connect()
    pool = ReplicaPool(PoolConfig(replica=ReplicaConfig(model=base.model, max_model_len=base.max_model_len,
                                                        max_lora_rank=base.lora.rank), num_replicas=base.replicas,
                                  name="teacher-bench")).launch()
    results = []
    try:
        for seed in (int(s) for s in args.seeds.split(",")):
            splits = iris.load_splits(seed)
            train, test = splits.train[: args.train_size], splits.test
            teacher = iris.Program()
            teacher.set_lm(dspy.LM("rule", engine=RuleEngine(), cache=False, num_retries=0))
            for epochs in (int(e) for e in args.epochs.split(",")):
                student = iris.Program()  # the base model: each setting starts from it
                student.set_lm(pool_lm(pool, max_tokens=base.max_tokens, stop=stop_for(base.adapter)))
                started = time.perf_counter()
                with dspy.context(adapter=make_adapter(base.adapter)):
                    step = WeightStep(iris.metric, replace(base.lora, epochs=epochs), lifecycle="relaunch",
                                      num_threads=base.threads)
                    tuned = step.compile(student, trainset=train, teacher=teacher,
                                         step_dir=Path("benchmarks/out/iris_teacher") / f"seed{seed}-e{epochs}",
                                         step_index=1)
                    wall = time.perf_counter() - started
                    before, after, rule_score = score_held_out([student, tuned, teacher], test, iris.metric,
                                                               num_threads=base.threads)
                metrics = step.last_run["trained"][0]["train_metrics"]
                row = {"seed": seed, "epochs": epochs, "rows": step.last_run["rows"],
                       "teacher_test": asdict(rule_score), "student_test": asdict(before),
                       "tuned_test": asdict(after), "loss_history": metrics["loss_history"],
                       "optimizer_steps": metrics["optimizer_steps"], "step_wall_s": wall}
                results.append(row)
                print(f"seed {seed}, {epochs} epochs: rule {rule_score.score:.1f}, student {before.score:.1f} "
                      f"({before.describe()}), tuned {after.score:.1f} ({after.describe()})", flush=True)
    finally:
        pool.kill()
    print("\n| seed | epochs | rows | rule (teacher) test % | student test % | tuned student test % | tuned answers "
          "| loss per epoch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        tuned = r["tuned_test"]
        print(f"| {r['seed']} | {r['epochs']} | {r['rows']} | {r['teacher_test']['score']:.1f} | "
              f"{r['student_test']['score']:.1f} | {tuned['score']:.1f} | {tuned['distinct']} distinct, most common "
              f"{tuned['top']!r} {tuned['top_count']}/{tuned['answered']} | "
              f"{[round(x, 3) for x in r['loss_history']]} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "iris_teacher", "date": time.strftime("%Y-%m-%d"),
                                          "machine": platform.node(), "cpus": os.cpu_count(), "args": vars(args),
                                          "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

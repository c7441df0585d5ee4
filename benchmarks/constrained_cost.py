"""What constrained decoding costs: the grammar engine alone, then whole calls on the pool.

(a) ``--part grammar``: the grammar engine's own work per generated token, outside vLLM, for the
    regex ``engine.adapters.constrained`` sends, per signature shape and ``max_tokens``: the
    ``bounded`` form (each free-text field a counted repetition ``{0,N}``, N an equal share of
    max_tokens: the adapter before issue 27) beside the ``unbounded`` form (``*``, the length left to
    max_tokens: the adapter now), for each backend vLLM offers (xgrammar, llguidance). One matcher
    per row walks the tokens of a plausible completion: per token ``fill_next_token_bitmask`` then
    ``accept_token``, as vLLM's scheduler does for every structured request at every decode step.
(b) ``--part pool``: the same programs' calls on a real pool, ``constrained`` vs ``chat`` adapter,
    same prompts, side by side in one run, at 1 and 2 replicas: per-call latency, the pool's
    completion tokens/s, completion tokens per call, and how many answers parse. Programs: Iris,
    GSM8K, HotPotQA's answer module, and a chain of three plain-``str`` modules written here.

    python benchmarks/constrained_cost.py --part grammar
    python benchmarks/constrained_cost.py --part pool --model smollm2-135m-instruct --calls 24

Prints a table and writes JSON (``--out``). Goals (issue 27): grammar < 0.1 ms per token at any
budget; constrained within 1.1x of chat per call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "true")

import report  # noqa: E402  (benchmarks/report.py)

REASONING = ("The petal length is small and the petal width is narrow, which matches the first species; the "
             "sepal measurements agree with that, so the flower is most likely of that kind. ")


def signatures() -> dict:
    """Signature shapes by name: each with its output fields in the order the adapter writes them."""
    import dspy

    from programs import gsm8k, iris

    cot = lambda sig: dspy.ChainOfThought(sig).predict.signature  # noqa: E731 -- reasoning prepended
    return {
        "iris (cot, Literal)": cot(iris.IrisSignature),
        "one str output": dspy.Signature("question -> answer"),
        "gsm8k (cot, str)": cot(gsm8k.GSM8KSignature),
        "three str outputs": dspy.Signature("text -> summary, keywords, title"),
    }


def plausible(signature, chars_per_field: int) -> str:
    """A completion in the adapter's layout: every value a real-looking text of about ``chars_per_field``."""
    from engine.adapters.constrained import COMPLETED, value_pattern

    parts = []
    for name, field in signature.output_fields.items():
        pattern = value_pattern(field.annotation)
        if pattern.max_chars is None:
            text = (REASONING * (chars_per_field // len(REASONING) + 1))[:chars_per_field - 1].rstrip() + "."
        else:
            args = getattr(field.annotation, "__args__", None)
            text = str(args[0]) if args else "True"
        parts.append(f"[[ ## {name} ## ]]\n{text}")
    return "\n\n".join(parts + [COMPLETED]) + "\n"


def grammar_rows(tokenizer_dir: str, budgets: list[int], backends: list[str], chars: int) -> list[dict]:
    """One row per (signature, budget, form, backend): compile seconds and grammar ms per token."""
    from transformers import AutoTokenizer

    from engine.adapters.constrained import output_regex

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    engines = {name: _BACKENDS[name](tok) for name in backends}
    rows = []
    for sig_name, sig in signatures().items():
        for budget in budgets:
            bound = old_field_budget(sig, budget)
            if bound is None or bound < 1:
                continue
            text = plausible(sig, min(chars, bound))  # within the old bound, so both forms accept it
            ids = tok(text, add_special_tokens=False)["input_ids"]
            for form, regex in (("bounded", bounded_regex(sig, bound)), ("unbounded", output_regex(sig))):
                for backend, engine in engines.items():
                    compile_s, per_token_ms, accepted = engine(regex, ids)
                    rows.append({"signature": sig_name, "max_tokens": budget, "bound": bound, "form": form,
                                 "backend": backend, "tokens": len(ids), "accepted": accepted,
                                 "compile_s": round(compile_s, 4), "ms_per_token": round(per_token_ms, 4),
                                 "cached_compile_s": round(getattr(engine, "cached_compile_s", float("nan")), 5)})
                    print(_fmt(rows[-1]), flush=True)
    return rows


def old_field_budget(signature, max_tokens: int) -> int | None:
    """The bound the adapter gave each free-text field before issue 27: an equal share of what
    ``max_tokens`` leaves after the fixed text (None: no free-text field)."""
    from engine.adapters.constrained import fixed_chars, value_pattern

    free = [n for n, f in signature.output_fields.items() if value_pattern(f.annotation).max_chars is None]
    return (max_tokens - fixed_chars(signature)) // len(free) if free else None


def bounded_regex(signature, bound: int) -> str:
    """The regex the adapter sent before issue 27: each free-text value a counted repetition ``{0,bound-1}``."""
    from engine.adapters.constrained import FREE_TEXT, output_regex

    return output_regex(signature).replace(FREE_TEXT, FREE_TEXT[:-1] + f"{{0,{bound - 1}}}")


def _xgrammar(tok):
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)  # as vLLM's backend has it

    def run(regex: str, ids: list[int]) -> tuple[float, float, bool]:
        started = time.perf_counter()
        ctx = compiler.compile_regex(regex)
        compile_s = time.perf_counter() - started
        started = time.perf_counter()
        assert compiler.compile_regex(regex) is not None  # the next call with the same regex: from the cache
        run.cached_compile_s = time.perf_counter() - started
        matcher = xgr.GrammarMatcher(ctx)
        bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
        started, ok = time.perf_counter(), True
        for t in ids:
            matcher.fill_next_token_bitmask(bitmask, 0)
            ok = ok and matcher.accept_token(t)
        return compile_s, (time.perf_counter() - started) * 1000 / len(ids), ok
    return run


def _llguidance(tok):
    import llguidance
    import llguidance.hf
    import llguidance.torch

    ll_tok = llguidance.hf.from_tokenizer(tok, len(tok))

    def run(regex: str, ids: list[int]) -> tuple[float, float, bool]:
        started = time.perf_counter()
        matcher = llguidance.LLMatcher(ll_tok, llguidance.grammar_from("regex", regex))
        compile_s = time.perf_counter() - started
        bitmask = llguidance.torch.allocate_token_bitmask(1, ll_tok.vocab_size)
        started, ok = time.perf_counter(), not matcher.is_error()
        for t in ids:
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            ok = ok and matcher.consume_token(t)
        return compile_s, (time.perf_counter() - started) * 1000 / len(ids), ok
    return run


_BACKENDS = {"xgrammar": _xgrammar, "guidance": _llguidance}


def _fmt(r: dict) -> str:
    return (f"{r['signature']:<20} {r['max_tokens']:>5} {str(r['bound']):>5} {r['form']:<9} {r['backend']:<9} "
            f"{r['tokens']:>5} {str(r['accepted']):<5} {r['compile_s']:>8.3f} {r['ms_per_token']:>10.3f}")


# -- (b) whole calls on a pool ---------------------------------------------------------------------


def programs_under_test() -> dict:
    """Program name -> (module factory, input dicts). HotPotQA: its answer module, on fixture contexts."""
    import dspy

    from programs import gsm8k, iris

    class ThreeStr(dspy.Module):  # a stranger's program: chained plain-str modules, only forward()
        def __init__(self):
            super().__init__()
            self.summarize = dspy.Predict("text -> summary")
            self.keywords = dspy.Predict("summary -> keywords")
            self.title = dspy.Predict("summary, keywords -> title")

        def forward(self, text):
            s = self.summarize(text=text).summary
            k = self.keywords(summary=s).keywords
            return self.title(summary=s, keywords=k)

    root = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
    iris_inputs = [e.inputs().toDict() for e in iris.load_splits(0).test]
    gsm = gsm8k.load_splits(0, root / "gsm8k", train_size=4, dev_size=4)
    gsm_inputs = [e.inputs().toDict() for e in gsm.train + gsm.dev + gsm.test]
    hotpot_inputs = [{"context": ["Paris is the capital and largest city of France."], "question": q}
                     for q in ("What is the capital of France?", "Which country is Paris in?",
                               "What kind of city is Paris?")]
    texts = [{"text": t} for t in ("The river flooded the old town after three days of rain; the mayor asked "
                                   "residents to move to higher ground.", "A new library opened downtown with "
                                   "a large children's section and free evening classes.", "The team won the final "
                                   "after a late goal, ending a twenty-year wait for the trophy.")]
    return {"iris": (iris.Program, iris_inputs), "gsm8k": (gsm8k.Program, gsm_inputs),
            "hotpotqa answer": (lambda: dspy.ChainOfThought("context, question -> answer"), hotpot_inputs),
            "three str modules": (ThreeStr, texts)}


MAX_TOKENS = {"iris": 150}  # the embedded default's; the other programs get --max-tokens


def pool_rows(model: str, replicas_list: list[int], calls: int, max_tokens: int) -> list[dict]:
    from actors import PoolConfig, ReplicaConfig, ReplicaPool, connect
    from actors.dspy_side.provider import pool_lm
    from engine.adapters import make_adapter, stop_for

    rows = []
    connect(num_cpus=max(replicas_list))
    for replicas in replicas_list:
        cfg = PoolConfig(replica=ReplicaConfig(model=model, num_cpus=1, max_model_len=2048), num_replicas=replicas)
        with ReplicaPool(cfg).launch() as pool:
            for name, (factory, inputs) in programs_under_test().items():
                batch = [inputs[i % len(inputs)] for i in range(calls)]
                for adapter in ("chat", "constrained"):
                    budget = MAX_TOKENS.get(name, max_tokens)
                    lm = pool_lm(pool, max_tokens=budget, stop=stop_for(adapter), cache=False)
                    rows.append(_time_program(pool, factory, batch, lm, make_adapter(adapter),
                                              dict(program=name, adapter=adapter, replicas=replicas,
                                                   max_tokens=budget)))
                    print(_fmt_pool(rows[-1]), flush=True)
    return rows


def _time_program(pool, factory, batch: list[dict], lm, adapter, row: dict) -> dict:
    import dspy

    program = factory()
    program.set_lm(lm)
    outcomes = []

    def one(inputs: dict):
        with dspy.context(adapter=adapter):
            started = time.perf_counter()
            try:
                program(**inputs)
                ok = True
            except Exception:  # noqa: BLE001 -- a parse failure or a cut answer: counted, not raised
                ok = False
            outcomes.append((time.perf_counter() - started, ok))

    one(batch[0])  # compile and warm once
    outcomes.clear()
    before = _tokens(pool)
    started = time.perf_counter()
    with ThreadPoolExecutor(8 * len(pool.stats())) as ex:
        list(ex.map(one, batch))
    wall = time.perf_counter() - started
    after = _tokens(pool)
    lat = sorted(t for t, _ in outcomes)
    return {**row, "programs": len(batch), "parsed": sum(ok for _, ok in outcomes), "wall_s": round(wall, 2),
            "program_p50_s": round(statistics.median(lat), 3), "lm_calls": after[0] - before[0],
            "completion_tokens_per_call": round((after[1] - before[1]) / max(1, after[0] - before[0]), 1),
            "pool_tok_s": round((after[1] - before[1]) / wall, 1)}


def _tokens(pool) -> tuple[int, int]:
    stats = pool.stats()
    return sum(s["requests"] for s in stats), sum(s["completion_tokens"] for s in stats)


def _fmt_pool(r: dict) -> str:
    return (f"{r['program']:<18} {r['adapter']:<11} {r['replicas']:>2} {r['parsed']:>3}/{r['programs']:<3} "
            f"{r['wall_s']:>7.1f} {r['program_p50_s']:>7.2f} {r['completion_tokens_per_call']:>7.1f} "
            f"{r['pool_tok_s']:>7.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("grammar", "pool"), default="grammar")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--budgets", default="150,512,1024", help="max_tokens values (grammar part)")
    ap.add_argument("--chars", type=int, default=300, help="characters of each free-text value (grammar part)")
    ap.add_argument("--backends", default="xgrammar,guidance")
    ap.add_argument("--replicas", default="1,2", help="pool sizes (pool part)")
    ap.add_argument("--calls", type=int, default=24, help="program runs per program and adapter (pool part)")
    ap.add_argument("--max-tokens", type=int, default=256, help="max_tokens of every call but Iris's 150 (pool part)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from actors import models

    if args.part == "grammar":
        print(f"{'signature':<20} {'max_t':>5} {'bound':>5} {'form':<9} {'backend':<9} {'toks':>5} {'ok':<5} "
              f"{'compile_s':>8} {'ms/token':>10}")
        rows = grammar_rows(models.resolve(args.model), [int(b) for b in args.budgets.split(",")],
                            args.backends.split(","), args.chars)
    else:
        print(f"{'program':<18} {'adapter':<11} {'n':>2} {'parsed':>7} {'wall_s':>7} {'p50_s':>7} {'tok/call':>7} "
              f"{'tok/s':>7}")
        rows = pool_rows(args.model, [int(r) for r in args.replicas.split(",")], args.calls, args.max_tokens)
        for r in rows:
            if r["adapter"] == "constrained":
                chat = next(c for c in rows if c["adapter"] == "chat" and c["program"] == r["program"]
                            and c["replicas"] == r["replicas"])
                r["wall_vs_chat"] = round(r["wall_s"] / chat["wall_s"], 2)
                print(f"{r['program']:<18} {r['replicas']} replica(s): constrained / chat wall = {r['wall_vs_chat']}")
    report.save(args.out or f"benchmarks/out/constrained_cost_{args.part}.json", "constrained_cost", args, rows=rows)


if __name__ == "__main__":
    main()

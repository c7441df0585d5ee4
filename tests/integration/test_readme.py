"""The README's Python snippets, run as written on the tiny model: the README cannot rot.

Each ```python block is extracted from README.md and run in its own process (its own local Ray),
with only these changes: the model name becomes ``tiny-llama``, ``adapter_dir`` points at a real
peft adapter made here, the data and answers are shorter (``SMALLER``: the random model never stops
before ``max_tokens``), and a preamble configures an adapter that reads the random model's
answers as "setosa" (it never writes DSPy's field markers), so a third of Iris passes the metric
and the weight steps have data. A snippet must exit 0 and leave no process behind.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import make_adapter
from tests.integration.processes import left_behind, marked_env, new_mark

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
PREAMBLE = '''
import dspy


class _ReadsSetosa(dspy.ChatAdapter):
    def parse(self, signature, completion):
        return {name: "setosa" for name in signature.output_fields}


dspy.configure(adapter=_ReadsSetosa())
'''


SMALLER = {"max_tokens=150": "max_tokens=16", "splits.train[:30]": "splits.train[:12]",
           "splits.dev[:15]": "splits.dev[:6]", "num_candidate_programs=6": "num_candidate_programs=2",
           "adapter=ConstrainedChatAdapter()": "adapter=_ReadsSetosa()"}  # the random model's text as an answer
# what each snippet prints when it worked: the strategies with their scores, the tuned model and its
# answer, the pool's answers and stats
PRINTS = {0: [r"\('p -> w', \d+(\.\d+)?\)", r"\('p -> w -> p', \d+(\.\d+)?\)"],
          1: [r"^tiny-llama:ft-\S+ \d+(\.\d+)? setosa$"], 2: [r"'requests': [1-9]"]}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_model):
    import ray

    if ray.is_initialized():  # each snippet starts its own local Ray: free the session's cores
        ray.shutdown()
    return make_adapter(tiny_model, tmp_path_factory.mktemp("readme") / "adapter")


def test_the_readme_has_its_snippets():
    assert len(SNIPPETS) == 3 and all("connect()" in s for s in SNIPPETS)
    assert all("flag_compilation_error_occurred" in SNIPPETS[i] for i in (0, 1))  # a failed step is not a result
    assert all(any(long in s for s in SNIPPETS) for long in SMALLER)  # what the tests shorten is still there


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=["better_together", "provider", "pool_api"])
def test_readme_snippet_runs(index, adapter, tmp_path):
    code = SNIPPETS[index].replace("smollm2-135m-instruct", "tiny-llama")
    code = code.replace('adapter_dir = "path/to/peft_adapter"', f"adapter_dir = {adapter!r}")
    for long, short in SMALLER.items():
        code = code.replace(long, short)
    mark = new_mark()
    done = subprocess.run([sys.executable, "-c", PREAMBLE + code], cwd=tmp_path, capture_output=True, text=True,
                          env=marked_env(mark, PYTHONPATH=str(ROOT)), timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert all(re.search(p, done.stdout, flags=re.M) for p in PRINTS[index]), done.stdout[-2000:]
    assert left_behind(mark) == []

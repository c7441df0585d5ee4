"""The tiny program ``test_gpu_configs`` runs in place of GSM8K / HotPotQA: one predictor, toy
arithmetic questions, every answer read as correct (the scripted engines write no field markers),
so every bootstrapped trace passes and the weight step has rows. Not a benchmark of anything."""

import dspy


class Lenient(dspy.ChatAdapter):
    """Reads any completion as the answer "forty two"."""

    def parse(self, signature, completion):
        return {name: "forty two" for name in signature.output_fields}


class OneStep(dspy.Module):
    def __init__(self):
        super().__init__()
        self.answer = dspy.Predict("question -> answer")

    def forward(self, question):
        with dspy.context(adapter=Lenient()):
            return self.answer(question=question)


def Program():
    return OneStep()


def load_splits(seed=0):
    rows = [dspy.Example(question=f"What is {i} + 1?", answer=str(i + 1)).with_inputs("question") for i in range(20)]
    return rows[:8], rows[8:12], rows[12:16]


def metric(example, prediction, trace=None):
    return prediction.answer == "forty two"

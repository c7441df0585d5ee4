"""A stranger's program, outside ``programs/``, for the tests that run one as a user would (its source is
copied into a temp dir or a job's ``py_modules``): one predictor; the random tiny model never writes the
field markers, so every completion reads as "forty two"; the metric passes half the examples whatever
the model says."""

import dspy


class Lenient(dspy.ChatAdapter):
    def parse(self, signature, completion):  # the random tiny model never writes the field markers
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
    rows = [dspy.Example(question=f"What is {i} + 1?", answer=str(i + 1)).with_inputs("question") for i in range(30)]
    return rows[:12], rows[12:18], rows[18:]


def metric(example, prediction, trace=None):
    return int(example.question.split()[2]) % 2 == 0  # half the examples pass, whatever the model says

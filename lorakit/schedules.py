"""The learning-rate schedules' names, apart from lorakit.optim (which implements them and imports torch), so that
``lorakit.train.config`` can offer them as choices and ``lorakit train --help`` prints without loading torch."""

SCHEDULES = ("cosine", "linear", "constant")

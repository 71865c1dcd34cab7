"""The reasoning lab: the whole SfN study at small scale, end to end on CPU, through the same commands as a real study.

    sfn lab                      # default size (small): data, base model, fine-tunes, gadgets, evaluation, report
    sfn lab --sweep              # the same, each fine-tune at the learning rate its own sweep picks on validation data
    sfn lab --scale small,medium # o_proj vs full at several model sizes
    sfn lab --root /tmp/lab --stage finetune

The lab's held-out tasks `lab_reason` / `lab_onestep` ship as data files with the evaluation package
(`sfn_train/evaluation/packaged_tasks/`); `problems.shipped_tasks()` generates them and the tests check the two agree.
The lab depends on evaluation, never the reverse.
"""

from __future__ import annotations

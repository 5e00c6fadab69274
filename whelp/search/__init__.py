"""``whelp search``: the best student shape of a teacher for a budget, found by pruning candidates (whelp.pruning),
distilling the best few briefly (whelp.distillation) and timing them (whelp.evals), so it sits above all three.

space.py (the shapes and their exact sizes) and budget.py (what a shape must not exceed) are pure; run.py runs the
search; report.py writes its outputs.
"""

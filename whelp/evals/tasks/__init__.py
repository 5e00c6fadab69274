"""Offline lm-eval tasks shipped with whelp (pass this directory as lm-eval's ``include_path``).

* ``whelp_pydoc`` - loglikelihood_rolling over the ``pydoc:eval`` split of the Python language reference
  (word/byte perplexity, bits per byte).
* ``whelp_licenses`` - loglikelihood_rolling over the Apache-2.0 and GPL-3 licence texts (``licenses.jsonl``,
  copied verbatim from Debian's ``/usr/share/common-licenses``, which both licences permit).
* ``whelp_pydoc_next`` - multiple choice: the true next sentence of a ``pydoc:eval`` paragraph against three
  sentences drawn from other paragraphs (acc, acc_norm; chance is 25%).

Datasets are built at run time by ``whelp_data.py`` (lm-eval's ``custom_dataset``), so nothing is fetched from a hub
and the tasks run with ``HF_HUB_OFFLINE=1``, including from an installed wheel.
"""

"""The decode engine: one preparation step, one step scorer, and the loops that drive them.

==================  ==============================================================
module              job
==================  ==============================================================
``members``         :class:`Member` (a model in a role) and :class:`Pair`
``prepare``         :func:`prepare`: bind the rule, render prompts, rooms, EOS ids,
                    rows (:class:`Prepared`)
``step``            the step scorer (log-probs, finiteness, ``StepContext``, rule),
                    sampling, log-prob records, :func:`~.step.emit`
``capabilities``    the one place that asks what a backend can do
``plain``           the plain loop (:func:`decode`)
``speculative``     speculative proxy decoding (the expert drafts)
``blackbox``        an API base (top-k) and pairs of another tokenizer
``requests``        :class:`~.requests.RequestCore`: what the server's scheduler drives
``continuous``      the server's running batch (requests join and leave)
``serial``          the other core: each request on the tuner's own loop, by step
``controls``        per-request alphas, active pairs and rules, validated
``overlap``         forwards of models on different weights at once, threads split
``crosstok``        pairs of another tokenizer, read in the base's ids
``detokenize``      text deltas that are safe to show, stop strings
``processor``       a ``transformers`` ``LogitsProcessor`` that proxy-tunes ``generate``
==================  ==============================================================

``docs/architecture.md`` walks a request through it.
"""

from .members import Member, Pair
from .plain import decode
from .prepare import Prepared, Row, prepare

__all__ = ["Member", "Pair", "Prepared", "Row", "decode", "prepare"]

"""``rlhfkit eval``: is policy A better than baseline B, by a judge that did not train it?

Win / tie / loss rates with a bootstrap interval over prompts, a length-controlled win rate,
the judge's mean scores, the KL of A to B and the response lengths (:mod:`.commands`); the
judges (:mod:`.judges`), the pure math (:mod:`.winrate`) and the report (:mod:`.report`).
"""

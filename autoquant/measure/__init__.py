"""The measurement method every backend follows: what one kernel timing is (``timing.py``) and
how timings of several things interleave so they sample the machine at the same moments
(``interleave.py``). Below the backends; imports none of them."""

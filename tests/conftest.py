"""Settings for the whole suite.

Hypothesis's per-example deadline (200 ms) is a timing goal, and timing
goals belong in `./dev bench`: on a loaded CI machine a slow example is not
a failure. Property tests keep their example counts; only the clock goes.
"""

from hypothesis import settings

settings.register_profile("tun2sx", deadline=None)
settings.load_profile("tun2sx")

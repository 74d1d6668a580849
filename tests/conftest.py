"""Suite-wide settings.

CI runs hypothesis derandomized (``GTBUS_HYPOTHESIS=ci``, set by ``.ci/run``):
the same examples on every run, so a red CI always reproduces. Locally the
default profile explores new examples each time, which is how the property
tests find things.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("GTBUS_HYPOTHESIS", "default"))

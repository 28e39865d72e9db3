"""The generators of the READMEs' claims blocks, one per block, grouped by the results they read:
``speed`` (engines, methods side by side, cost model, two processes), ``precision``, ``compare``
(500 edits), ``study15`` (the 10,000-edit study) and ``stream`` (the long-stream preset), ``chat``
(edits and the chat template), ``methods`` (every method's settings and speed), ``study2`` (the
study under the protocol), ``compare25`` (the new methods' 1,000-edit comparison). Importing the
package registers them all in ``GENERATORS``."""

from . import chat, compare, compare25, methods, precision, speed, stream, study2, study15
from .registry import GENERATORS, generator

__all__ = ["GENERATORS", "chat", "compare", "compare25", "generator", "methods", "precision",
           "speed", "stream", "study2", "study15"]

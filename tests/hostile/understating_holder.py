"""A real ``gtbus holder`` whose manifest understates its largest token id.

Run as ``python understating_holder.py HOLDER-OPTIONS...``: the same command
line as ``gtbus holder``, with one lie. Its data holds GPT-2 token ids, but its
manifest claims every id fits the run's vocabulary, so registration admits it
and only the device's check of each hop buffer can refuse the chunk: the path
whose refusal text must not carry a value of the holder's data.
"""

from __future__ import annotations

import sys

from gtbus.cli.main import main
from gtbus.training.shards import Dataset

Dataset.max_token = property(lambda self: 255)  # type: ignore[assignment,method-assign]

if __name__ == "__main__":
    main(["holder", *sys.argv[1:]])

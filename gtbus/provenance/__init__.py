"""Provenance of a trained model: what went into it, signed, and each holder's receipt of its share.

Modules, one idea each:

* :mod:`~gtbus.provenance.commitment`: a holder's hiding commitment to a chunk
  it provides (keyed BLAKE3; only the holder can recompute it);
* :mod:`~gtbus.provenance.document`: the canonical encoding and Ed25519
  signature of a JSON document (manifest, receipt), domain-separated;
* :mod:`~gtbus.provenance.ledger`: what the orchestrator records hop by hop
  (commitments, model digests, merges), kept in its checkpoint;
* :mod:`~gtbus.provenance.manifest`: the signed training manifest, written at
  the end of a run, and its checks (model files, logs);
* :mod:`~gtbus.provenance.receipt`: a holder's receipt of its own hops, how the
  holder accepts one, and how it checks a manifest against it and its data.
"""

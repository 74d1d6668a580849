"""gtbus: GPU Travelling for confidential collaborative training."""

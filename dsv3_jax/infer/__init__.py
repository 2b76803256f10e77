"""Generation: prefill, the compiled decode loop, sampling rules and MTP speculative decoding."""

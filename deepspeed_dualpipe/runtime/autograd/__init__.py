"""Backward in pieces: split backward (input now, weights later), tapes of autograd islands, the
step drivers that interleave two micro-batches, and the side-loss attachment of MoE layers."""

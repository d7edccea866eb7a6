"""The only place where scheduling bookkeeping becomes tensors."""

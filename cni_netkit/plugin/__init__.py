"""What each CNI command does: ADD, DEL, CHECK, STATUS, GC (VERSION lives in ``cni``)."""

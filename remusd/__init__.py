"""remusd: the primary side of Remus (protect, initial copy, epoch loop,
control socket, remusctl). Imports xenbind only, never receiver."""

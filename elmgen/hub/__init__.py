"""Other projects' released checkpoints as elmgen run folders: safe reading, key maps, hub loading."""

"""Scale-out: device meshes, logical-axis sharding rules, sharded state and batches, multi-process start-up,
rematerialisation. Model code only uses `logical` (names and constraints); everything else is wiring."""

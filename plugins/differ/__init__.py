"""Layer appliers and differs (io.berth.differ.v1): apply tar layers into snapshots, compute layers from them."""

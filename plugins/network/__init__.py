"""``io.berth.network.v1.bridge``: container networking with pyroute2 (netlink) and nftables."""

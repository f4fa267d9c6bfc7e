"""The agent: per-overlay orchestration of signaling, links, the bridge and the switch app."""

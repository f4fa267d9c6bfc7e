"""SocialVPN state (docs/social.md): pinned friend identities, this node's view of addresses,
the friend list. Pure: files in, decisions out; no XMPP, links or OVS (the agent joins them)."""

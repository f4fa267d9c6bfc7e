"""Open vSwitch: private instances, bridges and ports."""

"""The lab: a small internet in network namespaces (core services, NAT routers, hosts).

Used by the tests, the README demo and the benchmarks; the agent never imports it.
"""

from .spec import LabSpec, SiteSpec, NAT_KINDS
from .lab import Lab, HostInfo, destroy_lab, list_labs, orphaned_labs
from .netns import Namespaces, list_namespaces, ns_name

__all__ = ["Namespaces", "list_namespaces", "ns_name", "Lab", "LabSpec", "SiteSpec", "HostInfo", "NAT_KINDS", "destroy_lab", "list_labs", "orphaned_labs"]

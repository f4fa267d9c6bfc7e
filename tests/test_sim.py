"""The simulator (issue 16 item 4) at a few hundred nodes: the real policy, link-state and
flood plan, with the issue's budgets asserted. Pure (no lab); about 10 s in all."""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from ipop_switch.topology import TopologyParams
from ipop_switch.topology.sim import (Counters, SimConfig, Simulation, build_plans, run,
                                      simulate_broadcasts)


@pytest.fixture(scope="module")
def report() -> dict:
    return run(SimConfig(nodes=300, seed=3, plan_samples=1, pairs=1000))


def test_300_nodes_meet_the_budgets(report):
    g, n = report["graph"], 300
    assert report["bootstrap"]["converged"] and report["bootstrap"]["rounds"] <= 3
    assert g["connected"] and g["nodes"] == n
    assert g["degree_mean"] <= math.log2(n) + 4
    assert g["degree_max"] <= 24 and g["degree_min"] >= 4   # 2 successors + 2 predecessors at least
    assert g["hops_p99"] <= math.log2(n) and g["diameter"] <= math.log2(n)
    assert g["hops_pairs"] >= 900
    assert all(report["budget"].values()), report["budget"]


def test_every_broadcast_reaches_every_node_exactly_once(report):
    b = report["broadcast"]
    assert b["exactly_once"] and b["frames_per_node"] == 1.0
    assert b["receptions_min"] == b["receptions_max"] == 1 and b["roots"] == 20
    # and the sim's trees are the real compute_plan's
    assert report["plan"]["samples"] == 1 and report["plan"]["equal_to_sim_trees"]


def test_ten_percent_churn_converges_in_a_few_rounds_at_a_gentle_cost(report):
    ch = report["churn"]
    assert ch["converged"] and ch["rounds"] <= 4
    assert ch["leaves"] == ch["joins"] == 30
    assert 2 <= ch["links_created_per_event"] <= 15
    # LSAs: about a dozen per node per event (the changed nodes' LSAs), under 10 kB
    assert 0 < ch["lsa_messages_per_node_per_event"] <= 25 and ch["lsa_bytes_per_node_per_event"] < 10_000
    assert report["graph_after_churn"]["connected"]
    for name in ("one_join", "one_leave"):
        assert report[name]["converged"] and report[name]["rounds"] <= 3, report[name]
    assert report["one_join"]["created"] >= 2 + 1   # its successors and long links, its predecessors' links


def test_ondemand_links_appear_under_traffic_and_go_after_the_idle_timeout(report):
    od = report["ondemand"]
    p = TopologyParams()
    assert od["pairs"] == 4 and od["up"] + od["refused"] >= 4 and od["up"] >= 3
    assert od["role_on_demand"] and max(od["up_in_rounds"]) <= 2
    assert p.ondemand_idle <= od["seconds_until_removed"] <= p.ondemand_idle + p.ondemand_window + 2 * p.cycle
    assert od["settled"]


def test_small_groups_are_all_to_all():
    r = run(SimConfig(nodes=8, churn_pct=0, plan_samples=1, ondemand_pairs=0))
    g = r["graph"]
    assert g["degree_min"] == g["degree_max"] == 7 and g["diameter"] == 1
    assert r["broadcast"]["exactly_once"]


def test_the_consistency_check_and_the_broadcast_check_can_fail():
    sim = Simulation(SimConfig(nodes=60))
    c = Counters()
    sim.join(60, c)
    sim.run_until_stable(c)
    assert c.converged and sim.consistent()
    victim = next(n for n in sim.nodes.values() if n.db is not None)
    victim.db.remove(next(iter(victim.db.origins())))      # one LSA lost
    assert not sim.consistent()
    roots = sorted(sim.adj)[:3]
    plans = build_plans(sim.adj, roots)
    assert simulate_broadcasts(plans, roots)["exactly_once"]
    rp = next(rp for x in plans for rp in plans[x].roots.values() if rp.children and rp.root == roots[0])
    holder = next(x for x in plans if plans[x].roots.get(roots[0]) is rp)
    plans[holder].roots[roots[0]] = type(rp)(rp.root, rp.index, rp.dist, rp.parent, rp.children[1:])  # drop a child
    out = simulate_broadcasts(plans, roots)
    assert not out["exactly_once"] and out["receptions_min"] == 0


def test_the_cli_prints_the_table_and_writes_json(tmp_path):
    from ipop_switch.cli import cli
    path = tmp_path / "sim.json"
    res = CliRunner().invoke(cli, ["sim", "--nodes", "40", "--plan-samples", "1", "--pairs", "200",
                                   "--json", str(path)])
    assert res.exit_code == 0, res.output
    assert "frames per broadcast per node" in res.output and "unicast hops" in res.output
    data = json.loads(path.read_text())
    assert data["graph"]["nodes"] == 40 and data["broadcast"]["exactly_once"]
    bad = CliRunner().invoke(cli, ["sim", "--nodes", "40", "--max-degree", "4"])
    assert bad.exit_code == 1 and "max_degree" in bad.output

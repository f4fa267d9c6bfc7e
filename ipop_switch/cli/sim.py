"""``ipop-switch sim``: the topology policy, link-state and flood plan on N virtual nodes
(no OVS, no sockets, no root): the figures of docs/topology.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table


@click.command("sim")
@click.option("--nodes", default=1000, show_default=True, type=click.IntRange(2, 100_000), help="virtual nodes")
@click.option("--churn", "churn_pct", default=10.0, show_default=True, type=click.FloatRange(0, 50),
              help="percent of nodes that leave, and as many that join, at once after convergence")
@click.option("--seed", default=1, show_default=True, type=int, help="node ids, draws and samples")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="also write the figures as JSON ('-': stdout)")
@click.option("--all-to-all-max", default=8, show_default=True, type=click.IntRange(1, 4094))
@click.option("--max-degree", default=24, show_default=True, type=click.IntRange(3, 4094))
@click.option("--successors", default=2, show_default=True, type=click.IntRange(1, 16))
@click.option("--long-links", default=None, type=click.IntRange(0, 256), help="long links per node, both directions (default floor(log2 N))")
@click.option("--ondemand-slots", default=4, show_default=True, type=click.IntRange(0, 4094),
              help="links per node kept free of long links for on-demand ones")
@click.option("--ondemand-threshold", default=1e6, show_default=True, type=click.FloatRange(0),
              help="bit/s that make an on-demand link (0: off)")
@click.option("--pairs", default=2000, show_default=True, type=click.IntRange(1), help="sampled pairs for unicast hops")
@click.option("--roots", default=20, show_default=True, type=click.IntRange(1), help="broadcast origins simulated hop by hop")
@click.option("--plan-samples", default=3, show_default=True, type=click.IntRange(0),
              help="nodes whose full flood plan (compute_plan) is timed and checked")
@click.option("--max-rounds", default=60, show_default=True, type=click.IntRange(1))
def sim(nodes: int, churn_pct: float, seed: int, json_path: str | None, all_to_all_max: int, max_degree: int,
        successors: int, long_links: int | None, ondemand_slots: int, ondemand_threshold: float, pairs: int, roots: int,
        plan_samples: int, max_rounds: int) -> None:
    """Simulate N nodes running the real topology policy and flood plan; print the figures."""
    from ..errors import IpopError
    from ..topology import TopologyParams
    from ..topology.sim import SimConfig, run

    try:
        params = TopologyParams(all_to_all_max=all_to_all_max, max_degree=max_degree, successors=successors,
                                long_links=long_links, ondemand_slots=ondemand_slots,
                                ondemand_threshold_bps=ondemand_threshold, seed=seed)
    except ValueError as e:
        raise IpopError(str(e)) from None
    cfg = SimConfig(nodes=nodes, churn_pct=churn_pct, seed=seed, params=params, pairs=pairs,
                    broadcast_roots=roots, plan_samples=plan_samples, max_rounds=max_rounds)
    console = Console(width=None if sys.stdout.isatty() else 140, stderr=json_path == "-")
    with console.status(f"simulating {nodes} nodes ...") as st:
        report = run(cfg, progress=lambda s: st.update(f"{nodes} nodes: {s}"))
    print_report(report, console)
    if json_path == "-":
        click.echo(json.dumps(report, indent=1))
    elif json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))
    if not all(report["budget"].values()):
        sys.exit(1)


def _yes(ok: bool) -> str:
    return "[green]yes[/]" if ok else "[red]NO[/]"


def print_report(r: dict, console: Console) -> None:
    """The simulator's figures as one table (the rows docs/topology.md quotes)."""
    g, b, pl, bud = r["graph"], r["broadcast"], r["plan"], r["budget"]
    n = g["nodes"]
    t = Table(title=f"ipop-switch sim: {n} nodes (seed {r['config']['seed']}), "
                    f"{r['seconds_total']} s ({r['cpu_seconds_total']} s CPU)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("budget / note")
    p = r["params"]
    t.add_row("links per node opened: successors + long", f"{p['successors']} + {p['long_links_opened']}",
              f"long links per node (both ends) ~ {p['long_links_total']}")
    t.add_row("bootstrap: rounds to converge", str(r["bootstrap"]["rounds"]),
              _yes(r["bootstrap"]["converged"]) + f" ({r['bootstrap']['refused']} requests refused, re-drawn)")
    t.add_row("degree mean / max / min", f"{g['degree_mean']} / {g['degree_max']} / {g['degree_min']}",
              f"mean <= log2 N + 4 = {bud['log2_n'] + 4:.1f}: {_yes(bud['degree_mean_le_log2n_plus_4'])}; "
              f"max <= {p['max_degree']}: {_yes(bud['degree_max_le_max_degree'])}")
    t.add_row("diameter", f"{'' if g['diameter_exact'] else '>= '}{g['diameter']}",
              "exact" if g["diameter_exact"] else "lower bound (sampled eccentricities, double sweeps)")
    t.add_row("unicast hops p50 / p99 / max", f"{g['hops_p50']:.0f} / {g['hops_p99']:.0f} / {g['hops_max']}",
              f"{g['hops_pairs']} pairs; p99 <= log2 N = {bud['log2_n']}: {_yes(bud['hops_p99_le_log2n'])}")
    t.add_row("frames per broadcast per node", f"{b['frames_per_node']:.3f}",
              f"{b['roots']} origins, every node got each once: {_yes(b['exactly_once'])}")
    if pl.get("samples"):
        t.add_row("flood plan (compute_plan) per node", f"{pl['ms_mean']:.0f} ms",
                  f"{pl['samples']} nodes timed (max {pl['ms_max']:.0f} ms); "
                  f"trees equal to the sim's: {_yes(pl['equal_to_sim_trees'])}")
    else:
        t.add_row("flood plan (compute_plan) per node", "n/a", pl.get("note", "not sampled"))
    ch = r.get("churn")
    if ch:
        t.add_row(f"churn {ch['leaves']} leave + {ch['joins']} join: rounds", str(ch["rounds"]),
                  _yes(ch["converged"]) + " converged (every LinkStateDB = the graph, policy quiet)")
        t.add_row("  links created / torn per event", f"{ch['links_created_per_event']} / {ch['links_torn_per_event']}",
                  "torn includes the links of leaving nodes")
        t.add_row("  LSA messages / bytes per node per event",
                  f"{ch['lsa_messages_per_node_per_event']} / {ch['lsa_bytes_per_node_per_event']:.0f}",
                  f"{ch['lsa_messages']} messages in all")
    for name, label in (("one_join", "one join"), ("one_leave", "one leave")):
        e = r.get(name)
        if e:
            t.add_row(f"{label}: rounds; links created / torn", f"{e['rounds']}; {e['created']} / {e['torn'] + e['lost']}",
                      f"LSA messages / bytes per node: {e['lsa_messages_per_node_per_event']} / "
                      f"{e['lsa_bytes_per_node_per_event']:.0f}")
    od = r.get("ondemand", {})
    if od.get("pairs"):
        note = (f"in round(s) {od['up_in_rounds']}; removed {od['seconds_until_removed']} s after the traffic stopped"
                if od["up"] else "none came up (the requesters at their own caps or rate limits)")
        t.add_row("on-demand links (pairs 2+ hops apart)", f"{od['up']} of {od['pairs']} up",
                  f"{note}; {od['refused']} refused at a target's cap")
    console.print(t)
COMMANDS = [sim]

//! A model check of the NAT flow-creation protocol (`ebpf/src/nat.rs`, `create`): two
//! CPUs create the same flow at once, and every interleaving of their map operations is
//! explored. Each step of the model is one map operation of the program (a lookup, an
//! insert with `BPF_NOEXIST`, a delete), which the kernel performs atomically; what a CPU
//! does between them touches only its own stack. Keep the steps in line with `create`.
//!
//! The property a user relies on: when both are done, the flow's egress entry names a
//! reply entry that translates back to it — otherwise the flow's replies reach nobody.

use std::collections::HashMap;

/// The flow both CPUs create, and another flow that may hold its original port.
const FLOW: u8 = 1;
const OTHER: u8 = 2;
/// The flow's original port, and the range ports `choose_port` tries, in order.
const ORIGINAL: u16 = 40000;
const RANGE: [u16; 2] = [1024, 1025];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key {
    /// The flow's egress entry.
    Egress(u8),
    /// The reply entry of translated port `p`.
    Ingress(u16),
}

/// Egress entry: translated port. Ingress entry: the flow it translates back to.
type Table = HashMap<Key, u16>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Rollback {
    /// Before the fix: the loser always gives back its claim.
    Always,
    /// The loser gives back a claim only when it is not the winner's.
    UnlessTheWinners,
}

/// Where one CPU is in `create`.
#[derive(Clone, Copy, Debug)]
enum Pc {
    ClaimOriginal,
    AdoptOriginal,
    ClaimRange(usize),
    InsertEgress {
        port: u16,
        claimed: bool,
    },
    /// Lost the egress insert: the lookup of the winner's entry.
    LookupWinner {
        port: u16,
        claimed: bool,
    },
    Rollback {
        port: u16,
        winner: Option<u16>,
    },
    Done(Option<u16>),
}

/// Runs one map operation of `pc` on `table`; returns where the CPU goes next.
fn step(pc: Pc, table: &mut Table, rollback: Rollback) -> Pc {
    let claim = |table: &mut Table, port| match table.entry(Key::Ingress(port)) {
        std::collections::hash_map::Entry::Occupied(_) => false,
        std::collections::hash_map::Entry::Vacant(slot) => {
            slot.insert(u16::from(FLOW));
            true
        }
    };
    match pc {
        Pc::ClaimOriginal => {
            if claim(table, ORIGINAL) {
                Pc::InsertEgress {
                    port: ORIGINAL,
                    claimed: true,
                }
            } else {
                Pc::AdoptOriginal
            }
        }
        Pc::AdoptOriginal => {
            if table.get(&Key::Ingress(ORIGINAL)) == Some(&u16::from(FLOW)) {
                Pc::InsertEgress {
                    port: ORIGINAL,
                    claimed: false,
                }
            } else {
                Pc::ClaimRange(0)
            }
        }
        Pc::ClaimRange(i) if i == RANGE.len() => Pc::Done(None),
        Pc::ClaimRange(i) => {
            if claim(table, RANGE[i]) {
                Pc::InsertEgress {
                    port: RANGE[i],
                    claimed: true,
                }
            } else {
                Pc::ClaimRange(i + 1)
            }
        }
        Pc::InsertEgress { port, claimed } => {
            if let std::collections::hash_map::Entry::Vacant(slot) = table.entry(Key::Egress(FLOW))
            {
                slot.insert(port);
                Pc::Done(Some(port))
            } else {
                Pc::LookupWinner { port, claimed }
            }
        }
        Pc::LookupWinner { port, claimed } => {
            let winner = table.get(&Key::Egress(FLOW)).copied();
            let give_back = match rollback {
                Rollback::Always => claimed,
                Rollback::UnlessTheWinners => claimed && winner != Some(port),
            };
            if give_back {
                Pc::Rollback { port, winner }
            } else {
                Pc::Done(winner)
            }
        }
        Pc::Rollback { port, winner } => {
            table.remove(&Key::Ingress(port));
            Pc::Done(winner)
        }
        Pc::Done(_) => pc,
    }
}

/// Every schedule of two CPUs from `table`; calls `check` on each final table with the
/// port each CPU translated the packet to.
fn explore(
    table: &Table,
    cpus: [Pc; 2],
    rollback: Rollback,
    check: &mut impl FnMut(&Table, [Option<u16>; 2]),
) {
    let mut moved = false;
    for cpu in 0..2 {
        if matches!(cpus[cpu], Pc::Done(_)) {
            continue;
        }
        moved = true;
        let mut table = table.clone();
        let mut next = cpus;
        next[cpu] = step(cpus[cpu], &mut table, rollback);
        explore(&table, next, rollback, check);
    }
    if !moved {
        let done = cpus.map(|pc| match pc {
            Pc::Done(port) => port,
            _ => unreachable!(),
        });
        check(table, done);
    }
}

/// The violations of the property over every schedule, from each starting table.
fn violations(rollback: Rollback) -> Vec<String> {
    let starts = [
        ("an empty table", Table::new()),
        (
            "the original port held by another flow",
            Table::from([(Key::Ingress(ORIGINAL), u16::from(OTHER))]),
        ),
    ];
    let mut found = vec![];
    for (what, start) in starts {
        explore(
            &start,
            [Pc::ClaimOriginal; 2],
            rollback,
            &mut |table, ports| {
                let Some(&port) = table.get(&Key::Egress(FLOW)) else {
                    found.push(format!("{what}: no egress entry; {table:?}"));
                    return;
                };
                if table.get(&Key::Ingress(port)) != Some(&u16::from(FLOW)) {
                    found.push(format!(
                        "{what}: the egress entry names port {port}, whose reply entry is not the flow's; {table:?}"
                    ));
                }
                if ports.iter().any(|p| *p != Some(port)) {
                    found.push(format!(
                        "{what}: a CPU translated to {ports:?}, the flow holds {port}"
                    ));
                }
                if start.get(&Key::Ingress(ORIGINAL)) == Some(&u16::from(OTHER))
                    && table.get(&Key::Ingress(ORIGINAL)) != Some(&u16::from(OTHER))
                {
                    found.push(format!("{what}: the other flow lost its reply entry"));
                }
            },
        );
    }
    found
}

#[test]
fn two_cpus_creating_one_flow_leave_it_its_own_reply_entry_in_every_interleaving() {
    let found = violations(Rollback::UnlessTheWinners);
    assert!(
        found.is_empty(),
        "{} schedules break the flow, e.g. {}",
        found.len(),
        found[0]
    );
}

#[test]
fn the_model_finds_the_race_of_the_old_rollback() {
    // Control: the rollback before the fix deletes the reply entry the winner adopted.
    let found = violations(Rollback::Always);
    assert!(
        found
            .iter()
            .any(|v| v.contains("whose reply entry is not the flow's")),
        "the model must catch the old protocol's race; found {found:?}"
    );
}

//! Point-in-time restore: qemu-io writes distinct patterns through the export at several moments
//! (aligned, unaligned, multi-MiB, discard, write-zeroes); the same qemu-io commands applied to a
//! plain raw file give the reference of each moment; restoring each moment must give an image
//! identical to its reference, and trimmed ranges must be holes.

use crate::harness::{self, Rig, MIB};

/// One moment: what qemu-io does, and the range (if any) that must be a hole afterwards in the
/// restored image (a restore writes only non-zero data) and, for a discard, in the agent's
/// backing volume (TRIM punches a hole).
struct Step {
    what: &'static str,
    commands: &'static [&'static str],
    hole: Option<(u64, u64)>,
    backing_hole: bool,
}

const STEPS: &[Step] = &[
    Step {
        what: "aligned 4 MiB write",
        commands: &["write -P 0x11 0 4M"],
        hole: None,
        backing_hole: false,
    },
    Step {
        what: "unaligned write",
        commands: &["write -P 0x22 12345 100000"],
        hole: None,
        backing_hole: false,
    },
    Step {
        what: "24 MiB write (six 4 MiB restore extents)",
        commands: &["write -P 0x33 8M 24M"],
        hole: None,
        backing_hole: false,
    },
    Step {
        what: "discard 2 MiB",
        commands: &["discard 1M 2M"],
        hole: Some((MIB, 3 * MIB)),
        backing_hole: true,
    },
    Step {
        what: "write-zeroes 1 MiB inside written data",
        commands: &["write -z 20M 1M"],
        hole: Some((20 * MIB, 21 * MIB)),
        backing_hole: false,
    },
    Step {
        what:
            "unaligned FUA overwrite across the trimmed range, unaligned write-zeroes and discard",
        commands: &[
            "write -f -P 0x44 1000000 3000000",
            "write -z 33333 50000",
            "discard 30000000 4000000",
        ],
        hole: None,
        backing_hole: false,
    },
    Step {
        what: "one-byte write, last block, write-zeroes that may unmap",
        commands: &[
            "write -P 0x55 4095 1",
            "write -P 0x66 67104768 4096",
            "write -z -u 9M 2M",
        ],
        hole: Some((9 * MIB, 11 * MIB)),
        backing_hole: false,
    },
];

#[test]
fn every_moment_restores_identical_to_a_reference_and_trims_are_holes() {
    if !harness::require_tools(&["qemu-io", "qemu-img"]) {
        return;
    }
    const SIZE: u64 = 64 * MIB;
    let rig = Rig::new("moments", SIZE);
    let uri = rig.uri();
    let reference = rig.path("reference.img");
    harness::sparse_file(&reference, SIZE);

    // Moment 0: the empty volume, once the window is open.
    let mut moments = vec![(
        "empty volume",
        harness::now_rfc3339(),
        rig.path("ref-0.img"),
    )];
    harness::copy_file(&reference, &moments[0].2);

    for (i, step) in STEPS.iter().enumerate() {
        let mut commands = step.commands.to_vec();
        commands.push("flush");
        harness::qemu_io(&uri, &commands);
        // qemu-io exits once every write was acknowledged: the moment is now.
        let at = harness::now_rfc3339();
        harness::qemu_io(reference.to_str().unwrap(), &commands);
        let snapshot = rig.path(&format!("ref-{}.img", i + 1));
        harness::copy_file(&reference, &snapshot);
        if let (Some((start, end)), true) = (step.hole, step.backing_hole) {
            harness::assert_hole(&rig.volume_path, start, end, "agent's backing volume");
        }
        // What a client reads through the export (READ, BLOCK_STATUS) is the reference too.
        harness::assert_same_image_at(
            uri.as_ref(),
            &snapshot,
            &format!("export after {}", step.what),
        );
        let previous = &moments.last().unwrap().2;
        assert!(
            harness::images_differ(previous, &snapshot),
            "step {} ({}) must change the volume, or its moment proves nothing",
            i + 1,
            step.what
        );
        moments.push((step.what, at, snapshot));
    }

    let last = &moments.last().unwrap().1;
    harness::wait_durable(&rig.url(), &rig.volume, last);

    for (i, (what, at, snapshot)) in moments.iter().enumerate() {
        let out = rig.path(&format!("restored-{i}.img"));
        harness::restore(&rig.url(), &rig.volume, Some(at), &out);
        harness::assert_same_image(&out, snapshot, &format!("moment {i} ({what}) at {at}"));
        if i > 0 {
            if let Some((start, end)) = STEPS[i - 1].hole {
                harness::assert_hole(&out, start, end, &format!("restored moment {i} ({what})"));
            }
        }
        println!("moment {i} ({what}) at {at}: restored identical");
    }
    // Latest equals the last moment too.
    let latest = rig.restore_latest("restored-latest.img");
    harness::assert_same_image(&latest, &moments.last().unwrap().2, "latest");
}

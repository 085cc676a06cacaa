//! Links shaped with `tc` (issue 12): [`Fleet::shape_links`] puts `netem` rate and delay on the
//! fleet's own veths and bridge, and a fetch from the build store through a shaped link is no
//! faster than the shape allows (an upper bound only: a loaded machine makes it slower, never
//! faster). Unshaped, the same fetch over the veths runs at hundreds of MB/s.

use sluice_tests::fleet::{Fleet, FleetOptions, LinkShape, noise};

/// Incompressible bytes fetched through the shaped link.
const FILE_BYTES: usize = 4 << 20;
/// The store's uplink, bits per second: 4 MiB take about 0.84 s.
const STORE_RATE_BITS: u64 = 40_000_000;
/// Each host's link, faster than the store's, so the store's link is what limits the fetch.
const HOST_RATE_BITS: u64 = 1_000_000_000;

#[test]
fn a_fetch_through_shaped_links_is_no_faster_than_the_shape() {
    let Some(fleet) = Fleet::new(FleetOptions {
        hosts: 2,
        zookeepers: 0,
    }) else {
        return;
    };
    std::fs::write(fleet.http().root().join("blob"), noise(FILE_BYTES, 7)).unwrap();
    fleet.shape_links(LinkShape {
        host_rate_bits: HOST_RATE_BITS,
        // No delay: this machine's kernel has no sch_netem.
        host_delay_us: 0,
        store_rate_bits: STORE_RATE_BITS,
    });
    let shown = fleet
        .hub()
        .command("tc")
        .args(["qdisc", "show", "dev", "br0"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("tbf"), "br0's qdisc: {shown}");
    let rate = fleet.measure_fetch(0, "/blob").expect("the fetch succeeds");
    let limit = STORE_RATE_BITS as f64 / 8.0;
    eprintln!(
        "fetch through the shaped store link: {:.2} MB/s (shape {:.2} MB/s)",
        rate / 1e6,
        limit / 1e6
    );
    // tbf counts each packet's bytes with headers; the payload rate is below it.
    assert!(
        rate <= limit * 1.1,
        "{rate:.0} B/s through a {limit:.0} B/s link: the link is not shaped"
    );
}

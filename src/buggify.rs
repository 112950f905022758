//! BUGGIFY fault points: places where a rare path of the driver should be taken often in the
//! simulator (FoundationDB's technique). In a `--cfg madsim` build whose world enabled buggify
//! (`madsim::buggify::enable`), a point fires with a small probability drawn from the seed; in
//! the real world, and in simulated worlds that did not enable it, it never fires and costs
//! nothing.

use std::time::Duration;

/// Waits a while (up to `max`) if the point fires: a slow snapshot write, a late acknowledgement.
#[cfg(madsim)]
pub async fn delay(max: Duration) {
    use madsim::rand::Rng;
    if madsim::buggify::buggify_with_prob(0.05) {
        let millis = madsim::rand::thread_rng().gen_range(1..=max.as_millis().max(1) as u64);
        madsim::time::sleep(Duration::from_millis(millis)).await;
    }
}

/// Waits a while (up to `max`) if the point fires: never, outside the simulator.
#[cfg(not(madsim))]
#[inline(always)]
pub async fn delay(_max: Duration) {}

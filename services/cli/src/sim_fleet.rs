//! `fleetpatch sim-fleet`: the simulated machines in a process of their
//! own. Workers configured with `sim.fleet_url` reach it over loopback
//! HTTP (`fleetpatch_transport::sim_remote`), so a worker that dies leaves
//! the agents it started running, as on real machines. `GET /v1/sim/stats`
//! tells a fault test how many agents each deployment started and how many
//! reports each target's agents had acknowledged.

use fleetpatch_runtime::{Health, Shutdown};
use fleetpatch_transport::sim::{SimFleet, SimOptions};

#[derive(Debug, clap::Args)]
pub struct SimFleetArgs {
    /// Listen address (loopback: the fleet is for tests and demos).
    #[arg(long, default_value = "127.0.0.1:1073")]
    pub listen: String,
}

/// Serves the fleet until `shutdown`.
pub async fn run(args: SimFleetArgs, options: SimOptions, shutdown: Shutdown) -> anyhow::Result<()> {
    let fleet = SimFleet::new(options);
    let listener = fleetpatch_runtime::ops::bind(&args.listen).await?;
    tracing::info!(address = %listener.local_addr()?, "simulated fleet listening");
    let app = fleetpatch_transport::sim_remote::router(fleet).merge(fleetpatch_runtime::ops::router(Health::new()));
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.wait().await }).await?;
    Ok(())
}

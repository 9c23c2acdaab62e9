//! `fleetpatch sim-fleet`: the simulated machines in a process of their
//! own. Workers configured with `sim.fleet_url` reach it over loopback
//! HTTP (`fleetpatch_transport::sim_remote`), so a worker that dies leaves
//! the agents it started running, as on real machines. `GET /v1/sim/stats`
//! tells a fault test how many agents each deployment started and how many
//! reports each target's agents had acknowledged.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use fleetpatch_runtime::{Health, Shutdown};
use fleetpatch_transport::sim::{SimFleet, SimOptions, SimStats};
use fleetpatch_transport::sim_remote::{serve_op, SimAnswer, SimRequest};

#[derive(Debug, clap::Args)]
pub struct SimFleetArgs {
    /// Listen address (loopback: the fleet is for tests and demos).
    #[arg(long, default_value = "127.0.0.1:1073")]
    pub listen: String,
}

async fn op(State(fleet): State<SimFleet>, Json(request): Json<SimRequest>) -> Json<SimAnswer> {
    Json(serve_op(&fleet, request).await)
}

async fn stats(State(fleet): State<SimFleet>) -> Json<SimStats> {
    Json(fleet.stats())
}

/// Serves the fleet until `shutdown`.
pub async fn run(args: SimFleetArgs, options: SimOptions, shutdown: Shutdown) -> anyhow::Result<()> {
    let fleet = SimFleet::new(options);
    let listener = fleetpatch_runtime::ops::bind(&args.listen).await?;
    tracing::info!(address = %listener.local_addr()?, "simulated fleet listening");
    let app = Router::new()
        .route("/v1/sim", post(op))
        .route("/v1/sim/stats", get(stats))
        .with_state(fleet)
        .merge(fleetpatch_runtime::ops::router(Health::new()));
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.wait().await }).await?;
    Ok(())
}

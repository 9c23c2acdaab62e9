//! A scheduler API on SQLite, through the real router and server, for the
//! API's tests.

use std::sync::Arc;

use fleetpatch_store::{Role, Store};

pub(crate) struct Api {
    pub url: String,
    pub viewer_key: String,
    pub operator_key: String,
    pub store: Store,
    pub dir: TempDir,
    pub stop: fleetpatch_runtime::Shutdown,
    /// The API's create slots ([`crate::api::MAX_CONCURRENT_CREATES`]).
    pub creates: Arc<tokio::sync::Semaphore>,
}

/// A directory removed when the test ends.
pub(crate) struct TempDir(pub std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The API, checking requests against `input`.
pub(crate) async fn start_api(input: crate::api::InputPolicy) -> Api {
    let dir = std::env::temp_dir().join(format!("fp-content-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("db.sqlite").display());
    let store = Store::connect(&fleetpatch_store::StoreOptions { url, max_connections: 1 }).await.unwrap();
    store.migrate().await.unwrap();
    let viewer_key = store.create_api_key("relay", Role::Viewer, None).await.unwrap().expose_secret().to_owned();
    let operator_key = store.create_api_key("ops", Role::Operator, None).await.unwrap().expose_secret().to_owned();
    let creates = Arc::new(tokio::sync::Semaphore::new(crate::api::MAX_CONCURRENT_CREATES));
    let app = crate::api::router(crate::api::ApiState {
        store: store.clone(),
        bus: fleetpatch_bus::Bus::new(Arc::new(fleetpatch_bus::memory::MemoryBackend::new(
            &fleetpatch_proto::routing::WORK_QUEUES,
            10,
        ))),
        nudge: Arc::default(),
        content_dir: dir.join("content"),
        input: Arc::new(input),
        auth: crate::auth::Authenticator::new(store.clone(), None),
        creates: creates.clone(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = fleetpatch_runtime::Shutdown::new();
    let drain = stop.clone();
    tokio::spawn(async move {
        fleetpatch_runtime::http::serve(listener, app, Default::default(), async move { drain.wait().await }).await
    });
    Api { url, viewer_key, operator_key, store, dir: TempDir(dir), stop, creates }
}

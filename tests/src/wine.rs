//! Wine for the Windows tests: the prepared prefix (`scripts/wine-prefix.sh`),
//! the cross-built agent (`scripts/build-windows-agent.sh`), Wine's `sc`
//! and `reg`, and [`WineServices`], which hands the `smb` transport's service
//! calls to Wine's service manager (Samba has no `RCreateServiceW`).
//!
//! Anything missing fails the calling test with what to install; it never
//! skips.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use fleetpatch_transport_smb::{ServiceManager, ServiceManagers};
use fleetpatch_winproto::scmr::{CreateOutcome, ScmTimeouts, ServiceStatus};
use fleetpatch_winproto::{ServiceAccount, ServiceSpec, ServiceState, SmbSession, Win32Error};

/// The workspace's root.
pub fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate is in the workspace")
}

/// Runs one of the repository's scripts and returns its last stdout line.
fn script_last_line(script: &str, args: &[&str], what_to_install: &str) -> String {
    let output = Command::new(workspace().join("scripts").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/{script}: {e}"));
    assert!(
        output.status.success(),
        "scripts/{script} {args:?} failed ({}); {what_to_install}:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    stdout.lines().last().unwrap_or_else(|| panic!("scripts/{script} printed nothing")).trim().to_owned()
}

/// The Windows agent: `FLEETPATCH_WINDOWS_AGENT_EXE` (what CI exports), else
/// built with the repository's script (cached target dir).
pub fn agent_exe() -> PathBuf {
    let path = match std::env::var_os("FLEETPATCH_WINDOWS_AGENT_EXE") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(script_last_line(
            "build-windows-agent.sh",
            &["--no-install"],
            "install rustc-web cargo-web rust-web-src gcc-mingw-w64-x86-64 (scripts/build-windows-agent.sh does it \
             as root) or set FLEETPATCH_WINDOWS_AGENT_EXE",
        )),
    };
    assert!(path.is_file(), "the Windows agent {} is missing; run scripts/build-windows-agent.sh", path.display());
    path
}

/// A real one-file x64 MSI, built with wixl. (A 32-bit package would be
/// listed under `Wow6432Node`, as on 64-bit Windows.)
pub fn build_msi(directory: &Path, output: &Path, product: &str) {
    let payload = directory.join("readme.txt");
    std::fs::write(&payload, "installed by the fleetpatch wine test\n").unwrap();
    let wxs = directory.join("product.wxs");
    std::fs::write(
        &wxs,
        format!(
            r#"<?xml version="1.0" encoding="utf-8"?>
<Wix xmlns="http://schemas.microsoft.com/wix/2006/wi">
  <Product Id="*" Name="{product}" Language="1033" Version="1.0.0" Manufacturer="fleetpatch tests"
           UpgradeCode="{upgrade}">
    <Package InstallerVersion="200" Compressed="yes" InstallScope="perMachine"/>
    <Media Id="1" Cabinet="product.cab" EmbedCab="yes"/>
    <Directory Id="TARGETDIR" Name="SourceDir">
      <Directory Id="ProgramFiles64Folder">
        <Directory Id="INSTALLDIR" Name="FleetpatchWineTest">
          <Component Id="Readme" Guid="{component}">
            <File Id="Readme" Source="readme.txt" KeyPath="yes"/>
          </Component>
        </Directory>
      </Directory>
    </Directory>
    <Feature Id="Main" Level="1"><ComponentRef Id="Readme"/></Feature>
  </Product>
</Wix>
"#,
            upgrade = uuid::Uuid::new_v4().to_string().to_uppercase(),
            component = uuid::Uuid::new_v4().to_string().to_uppercase(),
        ),
    )
    .unwrap();
    // wixl takes Source paths relative to the working directory.
    let result = Command::new("wixl")
        .current_dir(directory)
        .args(["-a", "x64", "-o"])
        .arg(output)
        .arg(&wxs)
        .output()
        .expect("wixl (apt-get install wixl)");
    assert!(result.status.success(), "wixl failed: {}", String::from_utf8_lossy(&result.stderr));
}

/// A service's state as Wine's `sc query` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WineServiceStatus {
    pub state: String,
    pub win32_exit_code: u32,
    pub service_exit_code: u32,
}

impl WineServiceStatus {
    fn parse(text: &str) -> WineServiceStatus {
        let field = |name: &str| -> Vec<String> {
            let line = text
                .lines()
                .find(|line| line.trim_start().starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in sc query's output:\n{text}"));
            line.split(':').nth(1).unwrap().split_whitespace().map(str::to_owned).collect()
        };
        WineServiceStatus {
            state: field("STATE")[1].clone(),
            win32_exit_code: field("WIN32_EXIT_CODE")[0].parse().unwrap(),
            service_exit_code: field("SERVICE_EXIT_CODE")[0].parse().unwrap(),
        }
    }

    /// As SERVICE_STATUS (MS-SCMR 2.2.47) carries it.
    fn to_scm(&self) -> ServiceStatus {
        let current_state = match self.state.as_str() {
            "STOPPED" => 1,
            "START_PENDING" => 2,
            "STOP_PENDING" => 3,
            "RUNNING" => 4,
            "CONTINUE_PENDING" => 5,
            "PAUSE_PENDING" => 6,
            "PAUSED" => 7,
            _ => 0,
        };
        ServiceStatus {
            service_type: fleetpatch_winproto::scmr::constants::SERVICE_WIN32_OWN_PROCESS,
            current_state,
            win32_exit_code: self.win32_exit_code,
            service_specific_exit_code: self.service_exit_code,
            ..ServiceStatus::default()
        }
    }
}

/// A prepared prefix with its persistent wineserver.
#[derive(Debug, Clone)]
pub struct Wine {
    pub prefix: PathBuf,
}

impl Wine {
    /// The cached prefix, prepared (or checked) by `scripts/wine-prefix.sh`.
    pub fn prepare() -> Wine {
        let prefix = script_last_line(
            "wine-prefix.sh",
            &["prepare", "--no-install"],
            "install wine wine64 msitools wixl gcc-mingw-w64-x86-64 (scripts/wine-prefix.sh does it as root)",
        );
        Wine { prefix: PathBuf::from(prefix) }
    }

    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("wine");
        command.arg(program).env("WINEPREFIX", &self.prefix).env("WINEDEBUG", "-all").env_remove("DISPLAY");
        command
    }

    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        self.command(program).args(args).output().unwrap_or_else(|e| panic!("cannot run wine {program}: {e}"))
    }

    /// `sc ARGS`, which must succeed.
    pub fn sc(&self, args: &[&str]) -> String {
        let output = self.run("sc", args);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "wine sc {args:?}: {}\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    /// `sc query NAME`, or `None` when the service does not exist.
    pub fn query(&self, service: &str) -> Option<WineServiceStatus> {
        let output = self.run("sc", &["query", service]);
        if !output.status.success() {
            return None;
        }
        Some(WineServiceStatus::parse(&String::from_utf8_lossy(&output.stdout)))
    }

    pub fn wait_for_state(&self, service: &str, state: &str, limit: Duration) -> WineServiceStatus {
        let until = Instant::now() + limit;
        loop {
            let status = self.query(service);
            match status {
                Some(status) if status.state == state => return status,
                _ if Instant::now() > until => panic!("service {service} is not {state} after {limit:?}: {status:?}"),
                _ => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    }

    /// The prefix's `C:`.
    pub fn c_drive(&self) -> PathBuf {
        self.prefix.join("drive_c")
    }

    /// The Unix path of `C:\…`, following the prefix's case of existing folders.
    pub fn unix_path(&self, windows: &str) -> PathBuf {
        let rest = windows.strip_prefix("C:\\").unwrap_or_else(|| panic!("{windows} is not on C:"));
        let mut path = self.c_drive();
        for part in rest.split('\\').filter(|part| !part.is_empty()) {
            let existing = std::fs::read_dir(&path).ok().and_then(|entries| {
                entries.flatten().map(|e| e.file_name()).find(|name| name.to_string_lossy().eq_ignore_ascii_case(part))
            });
            path = path.join(existing.unwrap_or_else(|| part.into()));
        }
        path
    }

    /// Every `HKLM\…\Uninstall` entry, as `reg query /s` prints them.
    pub fn uninstall_entries(&self) -> String {
        let output = self.run("reg", &["query", r"HKLM\Software\Microsoft\Windows\CurrentVersion\Uninstall", "/s"]);
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The service's `ImagePath` as Wine's registry holds it.
    pub fn image_path(&self, service: &str) -> Option<String> {
        let key = format!(r"HKLM\System\CurrentControlSet\Services\{service}");
        let output = self.run("reg", &["query", &key, "/v", "ImagePath"]);
        let text = String::from_utf8_lossy(&output.stdout);
        let line = text.lines().find(|line| line.trim_start().starts_with("ImagePath"))?;
        line.split_once("REG_EXPAND_SZ").or_else(|| line.split_once("REG_SZ")).map(|(_, value)| value.trim().to_owned())
    }
}

/// Hands the `smb` transport's service calls, with the transport's own
/// [`ServiceSpec`], to Wine's service manager: the machine whose `C:` the
/// Samba peer serves as `C$`. Each call is one `wine sc` run. Wine's `sc`
/// prints no error code, so a failure is told apart by the service's state
/// afterwards (gone, stopped, running), as the Win32 code would have said.
#[derive(Debug, Clone)]
pub struct WineServices {
    pub wine: Wine,
    /// Every `ServiceSpec` the transport created, in order.
    pub created: std::sync::Arc<std::sync::Mutex<Vec<ServiceSpec>>>,
}

impl WineServices {
    pub fn new(wine: Wine) -> WineServices {
        WineServices { wine, created: Default::default() }
    }
}

#[async_trait::async_trait]
impl ServiceManagers for WineServices {
    async fn open(
        &self,
        _session: &SmbSession,
        _desired_access: u32,
        timeouts: ScmTimeouts,
    ) -> fleetpatch_winproto::Result<Box<dyn ServiceManager>> {
        Ok(Box::new(WineServiceManager { services: self.clone(), timeouts }))
    }
}

struct WineServiceManager {
    services: WineServices,
    timeouts: ScmTimeouts,
}

fn win32(operation: &'static str, code: Win32Error) -> fleetpatch_winproto::Error {
    fleetpatch_winproto::Error::Win32 { operation, code }
}

impl WineServiceManager {
    async fn sc(&self, args: Vec<String>) -> Output {
        let wine = self.services.wine.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            wine.run("sc", &args)
        })
        .await
        .expect("wine sc runs")
    }

    async fn status(&self, name: &str) -> Option<WineServiceStatus> {
        let wine = self.services.wine.clone();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || wine.query(&name)).await.expect("wine sc query runs")
    }

    async fn create_once(&self, spec: &ServiceSpec) -> fleetpatch_winproto::Result<()> {
        let mut args: Vec<String> = ["create", &spec.name, "binPath=", &spec.binary_path, "start=", "demand"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        args.extend(["DisplayName=".to_owned(), spec.display_name.clone()]);
        if let ServiceAccount::User { name, password } = &spec.account {
            args.extend(["obj=".to_owned(), name.clone(), "password=".to_owned(), password.clone()]);
        }
        if self.sc(args).await.status.success() {
            self.services.created.lock().expect("created lock").push(spec.clone());
            return Ok(());
        }
        let code = if self.status(&spec.name).await.is_some() {
            Win32Error::ERROR_SERVICE_EXISTS
        } else {
            Win32Error::ERROR_ACCESS_DENIED
        };
        Err(win32("CreateService (wine sc create)", code))
    }
}

#[async_trait::async_trait]
impl ServiceManager for WineServiceManager {
    async fn create_service(&mut self, spec: &ServiceSpec) -> fleetpatch_winproto::Result<CreateOutcome> {
        match self.create_once(spec).await {
            Ok(()) => Ok(CreateOutcome::Created),
            Err(error) if error.win32_code() == Some(Win32Error::ERROR_SERVICE_EXISTS) => {
                self.stop_and_wait(&spec.name).await?;
                self.delete(&spec.name).await?;
                self.create_once(spec).await?;
                Ok(CreateOutcome::ReplacedExisting)
            }
            Err(error) => Err(error),
        }
    }

    async fn start(&mut self, name: &str) -> fleetpatch_winproto::Result<()> {
        if self.sc(vec!["start".into(), name.into()]).await.status.success() {
            return Ok(());
        }
        Err(match self.status(name).await {
            None => win32("StartService (wine sc start)", Win32Error::ERROR_SERVICE_DOES_NOT_EXIST),
            Some(status) if status.state == "RUNNING" => {
                win32("StartService (wine sc start)", Win32Error::ERROR_SERVICE_ALREADY_RUNNING)
            }
            Some(_) => win32("StartService (wine sc start)", Win32Error::ERROR_SERVICE_REQUEST_TIMEOUT),
        })
    }

    async fn query_status(&mut self, name: &str) -> fleetpatch_winproto::Result<ServiceStatus> {
        match self.status(name).await {
            Some(status) => Ok(status.to_scm()),
            None => Err(win32("QueryServiceStatus (wine sc query)", Win32Error::ERROR_SERVICE_DOES_NOT_EXIST)),
        }
    }

    async fn stop_and_wait(&mut self, name: &str) -> fleetpatch_winproto::Result<()> {
        match self.status(name).await {
            None => return Err(win32("ControlService (wine sc stop)", Win32Error::ERROR_SERVICE_DOES_NOT_EXIST)),
            Some(status) if status.state == "STOPPED" => return Ok(()),
            Some(_) => {}
        }
        self.sc(vec!["stop".into(), name.into()]).await;
        let deadline = Instant::now() + self.timeouts.state_change;
        loop {
            match self.status(name).await {
                None => return Ok(()),
                Some(status) if status.to_scm().state() == ServiceState::Stopped => return Ok(()),
                Some(_) if Instant::now() >= deadline => {
                    return Err(win32("waiting for the service state", Win32Error::ERROR_SERVICE_REQUEST_TIMEOUT))
                }
                Some(_) => tokio::time::sleep(self.timeouts.poll_interval).await,
            }
        }
    }

    async fn delete(&mut self, name: &str) -> fleetpatch_winproto::Result<()> {
        if self.sc(vec!["delete".into(), name.into()]).await.status.success() || self.status(name).await.is_none() {
            return Ok(());
        }
        Err(win32("DeleteService (wine sc delete)", Win32Error::ERROR_ACCESS_DENIED))
    }

    async fn close(self: Box<Self>) {}
}

//! The stage step: the agent, the plan and the installers put in the
//! deployment's staging directory over one SFTP session (see the crate's
//! documentation for what runs on the target).

use super::*;

/// Read size when streaming a local file to the target: one SFTP write each
/// (OpenSSH's sftp-server takes up to 261,120 bytes of data in a write).
const UPLOAD_CHUNK_BYTES: usize = 255 << 10;

/// One file to upload in a stage.
struct Upload<'a> {
    name: &'a str,
    source: UploadSource<'a>,
    /// The sha256 the worker expects (installers), checked while streaming.
    expected_sha256: Option<&'a str>,
    expected_size: Option<u64>,
    mode: u32,
}

enum UploadSource<'a> {
    File(&'a Path),
    Bytes(Vec<u8>),
}

impl SshTransport {
    /// [`Transport::stage`]: the agent, the plan and the installers, over
    /// one connection from the pool.
    pub(crate) async fn stage_deployment(&self, target: &TargetSpec, deployment: &Deployment) -> Result<()> {
        let started = Instant::now();
        let paths = self.paths(target, deployment.id())?;
        let uploads = self.uploads(target, deployment)?;
        let connection = self.pool.connect(&self.options, target).await?;
        let result = self.stage_on(&connection, self.staging_root(target)?, &paths, uploads).await;
        self.done(target, connection, result.is_ok()).await;
        let bytes = result?;
        tracing::debug!(
            target_id = %target.target_id,
            deployment_id = %deployment.id(),
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "ssh stage done"
        );
        Ok(())
    }

    fn uploads<'a>(&self, target: &TargetSpec, deployment: &'a Deployment) -> Result<Vec<Upload<'a>>> {
        let address = self.address(target);
        let agent = deployment.agent_binary.as_deref().ok_or_else(|| Error::LocalFile {
            path: "fleetpatch-agent".into(),
            reason: "the ssh transport stages the agent binary, and the deployment names none; configure the \
                     agent binary for the target's architecture"
                .into(),
        })?;
        let plan = serde_json::to_vec_pretty(&deployment.plan).map_err(|e| Error::Remote {
            address: address.clone(),
            reason: format!("cannot serialize the deployment plan: {e}"),
            transient: false,
        })?;
        let mut uploads = vec![
            Upload {
                name: AGENT_FILE_NAME,
                source: UploadSource::File(agent),
                expected_sha256: None,
                expected_size: None,
                mode: 0o755,
            },
            Upload {
                name: fleetpatch_proto::plan::PLAN_FILE_NAME,
                source: UploadSource::Bytes(plan),
                expected_sha256: None,
                expected_size: None,
                mode: 0o600,
            },
        ];
        let mut seen = BTreeSet::new();
        for file in &deployment.files {
            let valid_hash = file.sha256.len() == 64 && file.sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !shell::is_safe_name(&file.name)
                || RESERVED_NAMES.contains(&file.name.as_str())
                || !seen.insert(&file.name)
            {
                return Err(Error::LocalFile {
                    path: file.source.clone(),
                    reason: format!(
                        "staged file name {:?} is not a plain, unique file name (A-Z a-z 0-9 . _ -, not one of {})",
                        file.name,
                        RESERVED_NAMES.join(", ")
                    ),
                });
            }
            if !valid_hash {
                return Err(Error::LocalFile {
                    path: file.source.clone(),
                    reason: format!("sha256 {:?} of {} is not 64 hex digits", file.sha256, file.name),
                });
            }
            uploads.push(Upload {
                name: &file.name,
                source: UploadSource::File(&file.source),
                expected_sha256: Some(&file.sha256),
                expected_size: Some(file.size),
                mode: 0o600,
            });
        }
        Ok(uploads)
    }
}

/// Streams `reader` into a new remote file, hashing what it sends, gives it
/// `mode` and reads its size back on the target: every write was
/// acknowledged (sftp-server answers each after its `write(2)`), SSH's MAC
/// guards every byte on the way, and the size the target has must be what
/// was sent. The agent checks each installer's sha256 again before it runs
/// it, so the target is not made to hash the files it just received.
async fn upload(
    sftp: &russh_sftp::client::SftpSession,
    address: &str,
    remote_path: &str,
    local_path: Option<&Path>,
    mode: u32,
    mut reader: impl AsyncRead + Unpin,
) -> Result<(String, u64)> {
    use russh_sftp::protocol::{FileAttributes, OpenFlags};
    let attributes = FileAttributes { permissions: Some(0o600), ..FileAttributes::empty() };
    let mut remote = sftp
        .open_with_flags_and_attributes(
            remote_path,
            OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE,
            attributes,
        )
        .await
        .map_err(|e| sftp_error(address, &format!("cannot create {remote_path}"), e))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buffer = vec![0u8; UPLOAD_CHUNK_BYTES];
    loop {
        let read = reader.read(&mut buffer).await.map_err(|e| Error::LocalFile {
            path: local_path.map(Path::to_path_buf).unwrap_or_default(),
            reason: format!("read failed: {e}"),
        })?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
        remote.write_all(&buffer[..read]).await.map_err(|e| Error::Remote {
            address: address.to_owned(),
            reason: format!("writing {remote_path} failed: {e}"),
            transient: true,
        })?;
    }
    // Both go after the writes on the session, and sftp-server answers in order.
    let moded = remote.set_metadata(FileAttributes { permissions: Some(mode), ..FileAttributes::empty() }).await;
    let on_target = remote.metadata().await;
    remote.shutdown().await.map_err(|e| Error::Remote {
        address: address.to_owned(),
        reason: format!("closing {remote_path} failed: {e}"),
        transient: true,
    })?;
    moded.map_err(|e| sftp_error(address, &format!("cannot set the mode of {remote_path}"), e))?;
    let on_target = on_target.map_err(|e| sftp_error(address, &format!("cannot read the size of {remote_path}"), e))?;
    if on_target.size != Some(size) {
        return Err(Error::Remote {
            address: address.to_owned(),
            reason: format!(
                "size mismatch for {remote_path} on the target: sent {size} bytes, the target has {} (disk full or \
                 interrupted transfer); the partial files were removed, retry the stage",
                on_target.size.map_or("no size".to_owned(), |s| format!("{s} bytes"))
            ),
            transient: true,
        });
    }
    Ok((hex::encode(hasher.finalize()), size))
}

impl SshTransport {
    /// Creates the directory, uploads what is missing, checks, commits:
    /// all of it over one SFTP session when the deployment's directory is
    /// new (the usual case), with no program started on the target. A
    /// directory that is there already (a retried stage) or that SFTP
    /// cannot create is prepared by the shell script, which also says which
    /// installers are already there intact. Returns the bytes sent.
    async fn stage_on(
        &self,
        connection: &Connection,
        staging_root: &str,
        paths: &StagingPaths,
        uploads: Vec<Upload<'_>>,
    ) -> Result<u64> {
        let address = connection.address.clone();
        let names: Vec<&str> = uploads.iter().map(|u| u.name).collect();
        let sftp = connection.sftp().await?;
        let existing: Vec<(String, String)> = if create_new_directory(&sftp, &paths.dir).await {
            Vec::new()
        } else {
            let prepare = shell::prepare_staging_script(staging_root, paths, &names);
            let output = match connection.run_plain(&prepare, "stage").await {
                Ok(output) => output,
                Err(error) => {
                    let _ = sftp.close().await;
                    return Err(error);
                }
            };
            if !output.success() {
                let _ = sftp.close().await;
                return Err(remote_failure(connection, "creating the staging directory", &output));
            }
            shell::sections(&output.stdout)
                .into_iter()
                .filter(|(header, _)| header.as_slice() == ["existing"])
                .flat_map(|(_, body)| body)
                .filter_map(|line| line.split_once(' ').map(|(hash, name)| (hash.to_owned(), name.to_owned())))
                .collect()
        };
        let already_there = |upload: &Upload<'_>| {
            upload.expected_sha256.is_some_and(|expected| {
                existing.iter().any(|(hash, name)| name == upload.name && hash.eq_ignore_ascii_case(expected))
            })
        };

        let to_send: Vec<&Upload<'_>> = uploads.iter().filter(|u| !already_there(u)).collect();
        let mut sent = Vec::new();
        let mut bytes = 0u64;
        for item in &to_send {
            let remote = paths.partial(item.name);
            let result = match &item.source {
                UploadSource::Bytes(data) => upload(&sftp, &address, &remote, None, item.mode, data.as_slice()).await,
                UploadSource::File(path) => match tokio::fs::File::open(path).await {
                    Ok(file) => upload(&sftp, &address, &remote, Some(path), item.mode, file).await,
                    Err(e) => Err(Error::LocalFile { path: path.to_path_buf(), reason: format!("cannot open: {e}") }),
                },
            };
            let (hash, size) = match result {
                Ok(done) => done,
                Err(error) => {
                    self.remove_partials(connection, &sftp, paths, &names).await;
                    return Err(error);
                }
            };
            bytes += size;
            if let (Some(expected), UploadSource::File(path)) = (item.expected_sha256, &item.source) {
                let size_ok = item.expected_size.is_none_or(|expected| expected == size);
                if !hash.eq_ignore_ascii_case(expected) || !size_ok {
                    self.remove_partials(connection, &sftp, paths, &names).await;
                    return Err(Error::LocalFile {
                        path: path.to_path_buf(),
                        reason: format!(
                            "content does not match the patch: expected sha256 {expected} ({} bytes), the file has \
                             {hash} ({size} bytes); re-upload the installer to the content store",
                            item.expected_size.map_or("?".into(), |s| s.to_string())
                        ),
                    });
                }
            }
            sent.push(item.name);
        }

        // Every file is complete (each write acknowledged, its size read
        // back on the target) and has its mode: move them into place.
        for name in &sent {
            let (partial, path) = (paths.partial(name), paths.file(name));
            if let Err(error) = commit(&sftp, &partial, &path).await {
                self.remove_partials(connection, &sftp, paths, &names).await;
                return Err(sftp_error(&address, &format!("cannot move {partial} into place"), error));
            }
        }
        let _ = sftp.close().await;
        Ok(bytes)
    }

    /// Removes the partial files after a failed upload: over the SFTP
    /// session while it still answers, else with a command.
    async fn remove_partials(
        &self,
        connection: &Connection,
        sftp: &russh_sftp::client::SftpSession,
        paths: &StagingPaths,
        names: &[&str],
    ) {
        use russh_sftp::client::error::Error as Sftp;
        use russh_sftp::protocol::StatusCode;
        let mut removed_all = true;
        for name in names {
            match sftp.remove_file(paths.partial(name)).await {
                Ok(()) => {}
                Err(Sftp::Status(status)) if status.status_code == StatusCode::NoSuchFile => {}
                Err(_) => {
                    removed_all = false;
                    break;
                }
            }
        }
        let _ = sftp.close().await;
        if removed_all {
            return;
        }
        if let Err(error) = connection.run_plain(&shell::remove_partials_script(paths, names), "stage").await {
            tracing::warn!(error = %error, "could not remove partial files after a failed stage");
        }
    }
}

/// Creates a deployment's directory (mode 700) over SFTP when neither it nor
/// anything else has that name yet and its parent exists: true when this
/// call created it, so it is empty and the login user's. False in every
/// other case (it exists, the staging root is missing, refused), for the
/// shell script to handle as it always did, with its checks and messages.
async fn create_new_directory(sftp: &russh_sftp::client::SftpSession, dir: &str) -> bool {
    use russh_sftp::protocol::FileAttributes;
    if sftp.create_dir(dir).await.is_err() {
        return false;
    }
    // mkdir over SFTP takes the server's umask; the mode is set exactly.
    sftp.set_metadata(dir, FileAttributes { permissions: Some(0o700), ..FileAttributes::empty() }).await.is_ok()
}

/// Renames an uploaded partial file to its name. SFTP's rename refuses to
/// replace a file (OpenSSH links, then unlinks): a name already taken (a
/// retried stage sends the agent and the plan again) is removed first.
async fn commit(
    sftp: &russh_sftp::client::SftpSession,
    partial: &str,
    path: &str,
) -> std::result::Result<(), russh_sftp::client::error::Error> {
    if sftp.rename(partial, path).await.is_ok() {
        return Ok(());
    }
    let _ = sftp.remove_file(path).await;
    sftp.rename(partial, path).await
}

//! `status`: the running daemon's connections, read from its admin
//! endpoint and printed as a table. Needs only `[admin] listen`.

use std::path::Path;

use crate::exit::Exit;

pub(crate) async fn status(path: &Path) -> Exit {
    let admin = match crate::config::load_admin(path) {
        Ok(admin) => admin,
        Err(error) => {
            for issue in &error.issues {
                eprintln!("aep-s3-rotator: {}: {issue}", path.display());
            }
            return Exit::Config;
        }
    };
    let Some(addr) = admin.listen else {
        eprintln!(
            "aep-s3-rotator: status reads the running daemon's admin endpoint, but the config has no [admin] listen; add one (e.g. listen = \"127.0.0.1:9464\") and restart the daemon"
        );
        return Exit::Config;
    };
    match crate::observe::admin::status_report(addr).await {
        Ok(table) => {
            print!("{table}");
            Exit::Ok
        }
        Err(error) => {
            eprintln!("aep-s3-rotator: {error}");
            Exit::Failure
        }
    }
}

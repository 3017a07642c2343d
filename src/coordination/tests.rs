// The lead's elector tests come here; until then the import is unused.
#[allow(unused_imports)]
use super::*;

//! SMART on FHIR scopes (App Launch 2.2, v1 and v2 syntax) and what they permit.
//!
//! A resource scope is `context/Type.perms[?query]`: context `patient`, `user` or `system`; `Type` a
//! resource type or `*`; perms the letters of `cruds` in that order (v2), or v1's `read` (= `rs`),
//! `write` (= `cud`) and `*` (= `cruds`). A query narrows the scope to resources that match it.

use std::fmt;

/// Who the scope speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Context {
    Patient,
    User,
    System,
}

impl Context {
    pub fn as_str(self) -> &'static str {
        match self {
            Context::Patient => "patient",
            Context::User => "user",
            Context::System => "system",
        }
    }
}

/// One of SMART's five permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    Create,
    Read,
    Update,
    Delete,
    Search,
}

impl Permission {
    const ALL: [(Permission, char); 5] = [
        (Permission::Create, 'c'),
        (Permission::Read, 'r'),
        (Permission::Update, 'u'),
        (Permission::Delete, 'd'),
        (Permission::Search, 's'),
    ];

    fn bit(self) -> u8 {
        match self {
            Permission::Create => 1,
            Permission::Read => 2,
            Permission::Update => 4,
            Permission::Delete => 8,
            Permission::Search => 16,
        }
    }

    pub fn letter(self) -> char {
        Self::ALL.iter().find(|(p, _)| *p == self).map(|(_, c)| *c).unwrap_or('?')
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Permissions(u8);

impl Permissions {
    pub const ALL: Permissions = Permissions(31);

    pub fn contains(self, p: Permission) -> bool {
        self.0 & p.bit() != 0
    }

    pub fn is_subset_of(self, other: Permissions) -> bool {
        self.0 & !other.0 == 0
    }

    /// v2 letters in `cruds` order (each at most once, in order), or a v1 word.
    fn parse(s: &str) -> Option<Permissions> {
        match s {
            "read" => return Some(Permissions(Permission::Read.bit() | Permission::Search.bit())),
            "write" => {
                return Some(Permissions(
                    Permission::Create.bit() | Permission::Update.bit() | Permission::Delete.bit(),
                ));
            }
            "*" => return Some(Permissions::ALL),
            "" => return None,
            _ => {}
        }
        let mut bits = 0u8;
        let mut next = 0usize;
        for c in s.chars() {
            let i = Permission::ALL.iter().position(|(_, l)| *l == c)?;
            if i < next {
                return None; // out of order or repeated
            }
            bits |= Permission::ALL[i].0.bit();
            next = i + 1;
        }
        Some(Permissions(bits))
    }

    fn letters(self) -> String {
        Permission::ALL.iter().filter(|(p, _)| self.contains(*p)).map(|(_, c)| *c).collect()
    }
}

/// `patient/Observation.rs?category=laboratory` and the like.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ResourceScope {
    pub context: Context,
    /// `None` for `*`.
    pub resource_type: Option<String>,
    pub permissions: Permissions,
    /// The narrowing query as written (without `?`), if any.
    pub query: Option<String>,
}

impl ResourceScope {
    pub fn covers_type(&self, resource_type: &str) -> bool {
        self.resource_type.as_deref().is_none_or(|t| t == resource_type)
    }

    /// Whether granting `self` is within `allowed` (same context, a type and permissions no wider, and
    /// no query dropped).
    fn within(&self, allowed: &ResourceScope) -> bool {
        self.context == allowed.context
            && (allowed.resource_type.is_none() || allowed.resource_type == self.resource_type)
            && self.permissions.is_subset_of(allowed.permissions)
            && (allowed.query.is_none() || allowed.query == self.query)
    }
}

/// One scope of a scope string.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    Resource(ResourceScope),
    OpenId,
    FhirUser,
    Launch,
    LaunchPatient,
    OfflineAccess,
    OnlineAccess,
}

/// A scope string that is not a scope Cairn knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown or malformed scope `{0}`")]
pub struct ScopeError(pub String);

impl Scope {
    pub fn parse(s: &str) -> Result<Scope, ScopeError> {
        let bad = || ScopeError(s.to_owned());
        Ok(match s {
            "openid" => Scope::OpenId,
            "fhirUser" => Scope::FhirUser,
            "launch" => Scope::Launch,
            "launch/patient" => Scope::LaunchPatient,
            "offline_access" => Scope::OfflineAccess,
            "online_access" => Scope::OnlineAccess,
            _ => {
                let (context, rest) = s.split_once('/').ok_or_else(bad)?;
                let context = match context {
                    "patient" => Context::Patient,
                    "user" => Context::User,
                    "system" => Context::System,
                    _ => return Err(bad()),
                };
                let (rest, query) = match rest.split_once('?') {
                    Some((r, q)) if !q.is_empty() => (r, Some(q.to_owned())),
                    Some(_) => return Err(bad()),
                    None => (rest, None),
                };
                let (rtype, perms) = rest.split_once('.').ok_or_else(bad)?;
                let resource_type = match rtype {
                    "*" => None,
                    t if !t.is_empty()
                        && t.chars().all(|c| c.is_ascii_alphanumeric())
                        && t.starts_with(|c: char| c.is_ascii_uppercase()) =>
                    {
                        Some(t.to_owned())
                    }
                    _ => return Err(bad()),
                };
                let permissions = Permissions::parse(perms).ok_or_else(bad)?;
                Scope::Resource(ResourceScope { context, resource_type, permissions, query })
            }
        })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::OpenId => f.write_str("openid"),
            Scope::FhirUser => f.write_str("fhirUser"),
            Scope::Launch => f.write_str("launch"),
            Scope::LaunchPatient => f.write_str("launch/patient"),
            Scope::OfflineAccess => f.write_str("offline_access"),
            Scope::OnlineAccess => f.write_str("online_access"),
            Scope::Resource(r) => {
                write!(
                    f,
                    "{}/{}.{}",
                    r.context.as_str(),
                    r.resource_type.as_deref().unwrap_or("*"),
                    r.permissions.letters()
                )?;
                if let Some(q) = &r.query {
                    write!(f, "?{q}")?;
                }
                Ok(())
            }
        }
    }
}

/// The scopes of a grant or a token, in the order given, without duplicates.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScopeSet(Vec<Scope>);

impl ScopeSet {
    /// Parses a space-separated scope string; any unknown scope is an error (RFC 6749 `invalid_scope`).
    pub fn parse(s: &str) -> Result<ScopeSet, ScopeError> {
        let scopes = s.split(' ').filter(|p| !p.is_empty()).map(Scope::parse).collect::<Result<Vec<_>, _>>()?;
        Ok(ScopeSet::deduplicated(scopes))
    }

    /// Like [`ScopeSet::parse`], but drops scopes it does not know instead of failing (for stored
    /// registrations written by another version).
    pub fn parse_known(s: &str) -> ScopeSet {
        ScopeSet::deduplicated(s.split(' ').filter_map(|p| Scope::parse(p).ok()).collect())
    }

    /// In the order given, each scope once.
    fn deduplicated(scopes: Vec<Scope>) -> ScopeSet {
        let mut out: Vec<Scope> = Vec::with_capacity(scopes.len());
        for scope in scopes {
            if !out.contains(&scope) {
                out.push(scope);
            }
        }
        ScopeSet(out)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, scope: &Scope) -> bool {
        self.0.contains(scope)
    }

    pub fn resource_scopes(&self) -> impl Iterator<Item = &ResourceScope> {
        self.0.iter().filter_map(|s| match s {
            Scope::Resource(r) => Some(r),
            _ => None,
        })
    }

    /// The requested scopes this client may have: each requested scope that some allowed scope
    /// covers. What is not allowed is dropped (RFC 6749 3.3 lets the server narrow a request).
    pub fn narrowed_to(&self, allowed: &ScopeSet) -> ScopeSet {
        ScopeSet(
            self.0
                .iter()
                .filter(|s| match s {
                    Scope::Resource(r) => allowed.resource_scopes().any(|a| r.within(a)),
                    other => allowed.contains(other),
                })
                .cloned()
                .collect(),
        )
    }

    /// Keeps only the scopes `keep` says yes to.
    pub fn filtered(&self, mut keep: impl FnMut(&Scope) -> bool) -> ScopeSet {
        ScopeSet(self.0.iter().filter(|s| keep(s)).cloned().collect())
    }

    /// The resource scopes that grant `permission` on `resource_type`.
    pub fn granting<'a>(
        &'a self,
        permission: Permission,
        resource_type: &'a str,
    ) -> impl Iterator<Item = &'a ResourceScope> {
        self.resource_scopes().filter(move |r| r.permissions.contains(permission) && r.covers_type(resource_type))
    }
}

impl fmt::Display for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(s: &str) -> ResourceScope {
        match Scope::parse(s).unwrap() {
            Scope::Resource(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v2_letters_must_be_in_cruds_order() {
        assert_eq!(rs("patient/Observation.rs").permissions, Permissions(2 | 16));
        assert_eq!(rs("system/*.cruds").permissions, Permissions::ALL);
        for bad in ["patient/Observation.sr", "patient/Observation.rr", "patient/Observation.x", "patient/Observation."]
        {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn v1_words_map_to_v2_letters() {
        assert_eq!(rs("user/Observation.read").permissions, rs("user/Observation.rs").permissions);
        assert_eq!(rs("user/Observation.write").permissions, rs("user/Observation.cud").permissions);
        assert_eq!(rs("user/*.*").permissions, Permissions::ALL);
    }

    #[test]
    fn queries_and_contexts() {
        let r =
            rs("patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory");
        assert_eq!(r.context, Context::Patient);
        assert_eq!(
            r.query.as_deref(),
            Some("category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory")
        );
        assert_eq!(Scope::parse(&Scope::Resource(r.clone()).to_string()).unwrap(), Scope::Resource(r));
        for bad in
            ["device/Observation.rs", "patient/observation.rs", "patient/Observation.rs?", "Observation.rs", "admin"]
        {
            assert!(Scope::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Scope::parse("launch/patient").unwrap(), Scope::LaunchPatient);
    }

    #[test]
    fn narrowing_keeps_only_what_is_allowed() {
        let allowed = ScopeSet::parse("system/Observation.cru system/Device.rs").unwrap();
        let asked =
            ScopeSet::parse("system/Observation.cr system/Observation.d system/Device.rs system/Patient.r").unwrap();
        assert_eq!(asked.narrowed_to(&allowed).to_string(), "system/Observation.cr system/Device.rs");
        // A wildcard allows every type; a query-constrained allowance does not allow the unconstrained scope.
        let wide = ScopeSet::parse("system/*.rs").unwrap();
        assert_eq!(ScopeSet::parse("system/Patient.r").unwrap().narrowed_to(&wide).to_string(), "system/Patient.r");
        let narrow = ScopeSet::parse("user/Observation.rs?category=vital-signs").unwrap();
        assert!(ScopeSet::parse("user/Observation.rs").unwrap().narrowed_to(&narrow).is_empty());
        // Context matters.
        assert!(ScopeSet::parse("user/Observation.r").unwrap().narrowed_to(&allowed).is_empty());
    }

    #[test]
    fn granting_finds_the_scopes_for_an_interaction() {
        let set = ScopeSet::parse("patient/Observation.rs patient/*.c openid").unwrap();
        assert_eq!(set.granting(Permission::Read, "Observation").count(), 1);
        assert_eq!(set.granting(Permission::Create, "Device").count(), 1);
        assert_eq!(set.granting(Permission::Delete, "Observation").count(), 0);
        assert_eq!(set.granting(Permission::Read, "Patient").count(), 0);
    }
}

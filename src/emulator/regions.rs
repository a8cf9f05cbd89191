//! Which region a request was sent to: the one its SigV4 signature's
//! credential scope names (`Credential=KEY/DATE/REGION/ivschat/aws4_request`),
//! as each of AWS's regional endpoints only answers for its own region.

use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;

/// The region `headers`' SigV4 credential scope names, if it names one.
pub(super) fn signed_for(headers: &HeaderMap) -> Option<&str> {
    let authorization = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let scope = authorization
        .split([' ', ','])
        .find_map(|part| part.strip_prefix("Credential="))?;
    // KEY/DATE/REGION/SERVICE/aws4_request; the key holds no slash.
    let mut fields = scope.split('/');
    let region = fields.nth(2)?;
    is_region(region).then_some(region)
}

/// Whether `name` can be a region: lowercase letters, digits and dashes.
pub(super) fn is_region(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn signed(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn the_region_is_the_credential_scope_s() {
        let headers = signed(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261201/eu-west-1/ivschat/aws4_request, \
             SignedHeaders=host;x-amz-date, Signature=abc",
        );
        assert_eq!(signed_for(&headers), Some("eu-west-1"));
        // boto3 puts no space after the comma.
        let headers = signed(
            "AWS4-HMAC-SHA256 Credential=K/20261201/ap-northeast-1/ivschat/aws4_request,SignedHeaders=host,Signature=abc",
        );
        assert_eq!(signed_for(&headers), Some("ap-northeast-1"));
    }

    #[test]
    fn no_scope_no_region() {
        assert_eq!(signed_for(&HeaderMap::new()), None);
        assert_eq!(signed_for(&signed("Bearer token")), None);
        assert_eq!(
            signed_for(&signed("AWS4-HMAC-SHA256 Credential=K/20261201")),
            None
        );
        assert_eq!(
            signed_for(&signed(
                "AWS4-HMAC-SHA256 Credential=K/20261201/US_EAST/ivschat/aws4_request"
            )),
            None
        );
    }
}

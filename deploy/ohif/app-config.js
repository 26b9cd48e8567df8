/** OHIF viewer configuration for gradcam-service's radiology pipeline.
 *
 * OHIF reads studies from DICOMweb at /dicom-web on its own origin: deploy/ohif/serve.py
 * (no containers) and the compose profile "pacs" (nginx.conf) pass that path to
 * Orthanc, so the browser needs no CORS. Pinned: @ohif/app 3.13.2 (deploy/ohif/VERSION).
 * @type {AppTypes.Config}
 */
window.config = {
  name: 'gradcam-service',
  routerBasename: '/',
  // The extensions and modes are those built into @ohif/app's dist/.
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (gradcam-service results)',
        name: 'orthanc',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        wadoUriRoot: '/dicom-web',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        staticWado: false,
        dicomUploadEnabled: false,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: {enabled: true},
      },
    },
  ],
};
